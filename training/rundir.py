"""The run directory: one per run, holding config.json (exactly how the run was made) and everything it writes.

RUN_DIR/config.json, tb/ (TensorBoard), checkpoints/, adapter.safetensors or model.pt (and *_best with
--eval-every), results.json / results.md / results.csv / results_cer.png / utterances.jsonl.
"""
import argparse
import json
import os
import sys
import time

import torch

from training.checkpoint import latest_checkpoint

# batch_size may change on resume so a different world size can keep the same global batch
RESUME_OVERRIDABLE = ("max_steps", "epochs", "eval_every", "save_every", "num_workers", "batch_size")


def resume_config(args, defaults: dict | None = None) -> argparse.Namespace:
    """The saved config of RUN_DIR, with only the flags that may change on resume taken from the command line;
    `defaults` fill the flags a run made before they existed does not record."""
    path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(path):
        sys.exit(f"error: --resume {args.resume}: no config.json there (is it a run directory?)")
    with open(path) as f:
        saved = {**(defaults or {}), **json.load(f)}
    changed = sorted(k for k in args.explicit - set(RESUME_OVERRIDABLE) - {"resume", "out", "config"}
                     if k in saved and getattr(args, k) != saved[k])
    if changed:  # the data order, model and recipe come from the run: a silently ignored flag would mislead
        k = changed[0]
        raise SystemExit(f"error: --resume {args.resume} continues the run as it was made (--{k.replace('_', '-')} "
                         f"{saved[k]}); drop --{k.replace('_', '-')}, or start a new run with another --out "
                         f"(may change on resume: {', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDABLE)})")
    saved["resumed_global_batch"] = saved["batch_size"] * saved.get("world_size", 1)  # checked in open_run_dir
    for key in RESUME_OVERRIDABLE:
        if key in args.explicit:
            saved[key] = getattr(args, key)
    saved["resume"], saved["out"] = args.resume, args.resume
    return argparse.Namespace(**saved)


def open_run_dir(args, argv, *, world: int, is_main: bool) -> tuple[str, dict]:
    """(run directory, config): --out or runs/<timestamp>, the same on every rank; config.json written by rank 0.

    A directory that already holds a run's checkpoints is refused unless the run is being resumed.
    """
    run_dir = args.out or os.path.join("runs", time.strftime("%Y-%m-%d_%H%M%S"))
    if world > 1:  # every rank must write to rank 0's directory, even if their clocks crossed a second
        shared = [run_dir]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    args.out = run_dir
    global_batch = vars(args).pop("resumed_global_batch", None)
    if global_batch is not None and global_batch != args.batch_size * world:
        raise SystemExit(f"error: --resume {run_dir}: the run's global batch was {global_batch} clips per micro-step "
                         f"and {world} process(es) x --batch-size {args.batch_size} make {args.batch_size * world}: "
                         f"pass --batch-size {global_batch // world}" + ("" if global_batch % world == 0 else
                                                                         " (or use a number of processes that divides it)"))
    if not args.resume and latest_checkpoint(run_dir):
        raise SystemExit(f"error: --out {run_dir} already holds a run: continue it with --resume {run_dir}, "
                         "or choose another --out")
    config = {k: v for k, v in sorted(vars(args).items())}
    config["argv"] = sys.argv[1:] if argv is None else list(argv)
    config["world_size"] = world
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return run_dir, config
