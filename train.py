"""Fine-tune Whisper on dialects, languages or domains: full fine-tuning or LoRA, one loop, top to bottom.

    python train.py                                  # the offline demo: LoRA on Whisper base, synthetic Tibetan
    python train.py --mode lora --dialect amdo       # one adapter for one dialect
    python train.py --mode full --dialect balanced --model tiny --data openpecha
    python train.py --resume runs/2026-12-02_1700    # continue exactly where a run stopped

Every flag has a default; `--config FILE.json` supplies values for any of them, flags on the command line
win. The resolved configuration is written to RUN_DIR/config.json, and everything the run writes
(checkpoints, the adapter or model, TensorBoard events, the results table) lives under RUN_DIR.
"""
import argparse
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data.collate import Collator, SpeechDataset, make_loader
from data.samplers import DialectSampler
from data.sources import DIALECTS, limit_per_dialect, load_examples
from lora.adapters import save_adapter, set_active_adapter
from lora.inject import count_parameters, describe_trainable, lora_modules, mark_only_lora_trainable
from lora.int8 import quantize_frozen_linears, storage_bytes
from lora.rank import STRATEGIES, apply_rank_strategy
from whisper_ft import checkpoint as ckpt
from whisper_ft.augment import add_augment_args, augment_from_args
from whisper_ft.encoder import enable_dynamic_audio_ctx
from whisper_ft.evaluation import evaluate_systems, format_table, write_results
from whisper_ft.host_memory import keep_freed_memory
from whisper_ft.models import ModelSpecError, export_openai, fingerprint, load_model
from whisper_ft.specaugment import add_specaugment_args, make_generator, specaugment_from_args
from whisper_ft.text import resolve_language, tokenizer_for
from whisper_ft.training import (NullWriter, ProgressLog, all_sum, build_optimizer, enable_grad_checkpointing,
                                 init_distributed, lr_at, peak_memory_mb, resolve_amp, select_dialects)

# batch_size may change on resume so a different world size can keep the same global batch
RESUME_OVERRIDABLE = ("max_steps", "epochs", "eval_every", "save_every", "num_workers", "batch_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file of flag values (flags given here override it)")
    p.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    g.add_argument("--data", default="demo", help="data source: demo, openpecha, hf:NAME, or a manifest path")
    g.add_argument("--eval-data", default=None, help="test source (default: --data's test split)")
    g.add_argument("--language", default="bo", help="language token to train and decode with")
    g.add_argument("--language-fallback", default=None,
                   help="Whisper language token to reuse for a language Whisper lacks (e.g. bo for Dzongkha)")
    g.add_argument("--dialect", default="balanced",
                   help="amdo|kham|utsang|a,b (balanced over those)|balanced (all, equal)|all (natural mix)")
    g.add_argument("--sampling", default=None, choices=["balanced", "proportional", "temperature", "natural"],
                   help="override how dialects are mixed (default follows --dialect)")
    g.add_argument("--temperature", type=float, default=1.0, help="for --sampling temperature: p ~ n^(1/T)")
    g.add_argument("--samples", type=int, default=None, help="training samples per epoch (default: all rows)")
    g.add_argument("--strict", action="store_true", help="any bad data row is an error before training")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--mode", default="lora", choices=["lora", "full"])
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="clips per micro-batch")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 lora, 1e-5 full)")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--freeze-encoder", action="store_true")
    g.add_argument("--base-8bit", action="store_true",
                   help="LoRA only: hold the frozen base's Linear weights in int8, one scale per output channel "
                        "(bitsandbytes' kernel on CUDA when installed); adapters stay fp32 and load on the fp32 base")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: bf16 on CUDA where supported, else fp16; fp32 on CPU")
    g.add_argument("--audio-ctx", default="full",
                   help="full (30 s windows, as the research), auto (crop to the batch), or a frame count")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="qv", help="qv | attn | all-linear | comma-separated regexes")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--rank-strategy", default="fixed", choices=STRATEGIES)
    g.add_argument("--rank-spec", default=None, help="mixed: e.g. encoder=8,decoder=32")
    g.add_argument("--warmup-r", type=int, default=None, help="warmup: the high rank trained first")
    g.add_argument("--switch-step", type=int, default=None, help="warmup: step at which to truncate to r")
    g = p.add_argument_group("augmentation (training only)")
    add_specaugment_args(g)
    add_augment_args(g)
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every K steps (0: only at start and end); keeps the best "
                   "(lowest macro CER) as adapter_best.safetensors or model_best.pt")
    g.add_argument("--eval-samples", type=int, default=None, help="test clips per dialect (default: all)")
    g.add_argument("--eval-batch-size", type=int, default=16)
    g.add_argument("--beam-size", type=int, default=1)
    g.add_argument("--no-base-eval", action="store_true", help="skip scoring the untrained base at step 0")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--report-memory", action="store_true", help="run a few steps, print peak memory, exit")

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    known, _ = first.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {known.config}: {e}")
        unknown = set(values) - {a.dest for a in p._actions}
        if unknown:
            p.error(f"--config {known.config}: unknown keys {sorted(unknown)}")
        p.set_defaults(**values)
    args = p.parse_args(argv)
    args.explicit = {a.dest for a in p._actions if any(s in (argv or sys.argv[1:]) for s in a.option_strings)}
    return args


def resume_config(args) -> argparse.Namespace:
    """The saved config of RUN_DIR, with only the flags that may change on resume taken from the command line."""
    path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(path):
        sys.exit(f"error: --resume {args.resume}: no config.json there (is it a run directory?)")
    with open(path) as f:
        saved = json.load(f)
    for key in RESUME_OVERRIDABLE:
        if key in args.explicit:
            saved[key] = getattr(args, key)
    saved["resume"], saved["out"] = args.resume, args.resume
    return argparse.Namespace(**saved)


def main(argv=None, on_eval=None) -> dict:
    """Run one training run; returns its results ({} on ranks other than 0).

    on_eval(step, result), when given, is called on rank 0 after every evaluation of the model being trained
    (each --eval-every step and the final one) with that evaluation's result ({dialect: {"cer": ...}, "_macro":
    ..., "_micro": ...}): an in-process caller such as tune.py follows the run through it, and stops it by raising.
    """
    args = parse_args(argv)
    if args.resume:
        args = resume_config(args)
    vars(args).pop("explicit", None)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rank, world, local_rank = init_distributed(device)  # torchrun --nproc_per_node N train.py ...
    is_main = rank == 0
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    if device == "cpu":
        keep_freed_memory()  # activations live in host memory: reuse it instead of faulting in new pages
    run_dir = args.out or os.path.join("runs", time.strftime("%Y-%m-%d_%H%M%S"))
    if world > 1:  # every rank must write to rank 0's directory, even if their clocks crossed a second
        shared = [run_dir]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    args.out = run_dir
    if not args.resume and ckpt.latest_checkpoint(run_dir):
        raise SystemExit(f"error: --out {run_dir} already holds a run: continue it with --resume {run_dir}, "
                         "or choose another --out")
    config = {k: v for k, v in sorted(vars(args).items())}
    config["argv"] = sys.argv[1:] if argv is None else list(argv)
    config["world_size"] = world
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

    # -- device, precision ------------------------------------------------------------------------
    amp_dtype, use_scaler = resolve_amp(args.amp, device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype) if amp_dtype else nullcontext()
    torch.manual_seed(args.seed)

    # -- model ------------------------------------------------------------------------------------
    base_8bit = getattr(args, "base_8bit", False)  # absent from the config of a run made before the flag
    if base_8bit and args.mode != "lora":
        raise SystemExit("error: --base-8bit is for --mode lora only: it freezes the base in int8, and full "
                         "fine-tuning trains those weights (drop --base-8bit, or use --mode lora)")
    model = load_model(args.model, device)
    base_fp = fingerprint(model)  # of the fp32 base, before any quantisation: adapters stay portable to it
    if base_8bit:
        fp32_mb = storage_bytes(model) / 2**20
        n_int8 = len(quantize_frozen_linears(model))
        print(f"base in int8: {n_int8} Linear layers, weights {fp32_mb:.0f} MB -> {storage_bytes(model) / 2**20:.0f} MB")
    try:
        language = resolve_language(args.language, fallback=args.language_fallback)
    except ValueError as e:
        raise SystemExit(f"error: --language: {e}") from None
    tokenizer = tokenizer_for(model, language)
    adapter_name = args.dialect if args.dialect in DIALECTS else "default"
    rank_hook = None
    if args.mode == "lora":
        targets = args.lora_targets if "," not in args.lora_targets and "\\" not in args.lora_targets \
            else args.lora_targets.split(",")
        strategy_args = {k: v for k, v in dict(spec=args.rank_spec, warmup_r=args.warmup_r,
                                                switch_step=args.switch_step).items() if v is not None}
        if args.rank_strategy == "dynamic":
            strategy_args["total_steps"] = None  # filled in once the step count is known
        model_kw = dict(name=adapter_name, targets=targets, r=args.lora_r, alpha=args.lora_alpha,
                        dropout=args.lora_dropout, rslora=args.rslora)
    else:
        for p_ in model.parameters():
            p_.requires_grad_(True)
        if args.freeze_encoder:
            model.encoder.requires_grad_(False)
    # also at full windows: encode() computes what whisper's encoder does (bitwise, tests/test_encoder.py)
    # with a contiguous residual stream, so no LayerNorm copies its input (~2% of a LoRA step)
    enable_dynamic_audio_ctx(model)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)

    # -- data -------------------------------------------------------------------------------------
    train_examples, report = load_examples(args.data, "train", language=language, strict=args.strict)
    print(report.summary())
    include, mode = select_dialects(args.dialect, args.sampling, sorted({e.dialect for e in train_examples}))
    sampler = DialectSampler([e.dialect for e in train_examples], mode=mode, include=include,
                             num_samples=args.samples, temperature=args.temperature, seed=args.seed,
                             rank=rank, world_size=world)
    wave_augment = augment_from_args(args)
    wave_augment = wave_augment if wave_augment.enabled else None
    spec_augment = specaugment_from_args(args)
    n_mels = model.dims.n_mels
    audio_ctx = args.audio_ctx if args.audio_ctx in ("full", "auto") else int(args.audio_ctx)
    dataset = SpeechDataset(train_examples, n_mels=n_mels, wave_augment=wave_augment, seed=args.seed)
    collator = Collator(tokenizer, n_mels=n_mels, audio_ctx=audio_ctx)
    loader = make_loader(dataset, sampler, collator, args.batch_size, num_workers=args.num_workers)
    test_examples, test_report = load_examples(args.eval_data or args.data, "test", language=language)
    print(test_report.summary())
    test_examples = limit_per_dialect(test_examples, args.eval_samples)
    eval_dataset = SpeechDataset(test_examples, n_mels=n_mels)  # never augmented
    eval_collator = Collator(tokenizer, n_mels=n_mels, audio_ctx=audio_ctx)

    micro_per_epoch = math.ceil(sampler.num_samples_per_epoch() / (args.batch_size * world))
    total_steps = args.max_steps or math.ceil(micro_per_epoch * args.epochs / args.grad_accum)
    if args.mode == "lora":
        if args.rank_strategy == "dynamic":
            strategy_args["total_steps"] = total_steps
        rank_hook = apply_rank_strategy(model, args.rank_strategy, **model_kw, **strategy_args)
        model.to(device)
        mark_only_lora_trainable(model)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * total_steps))
    peak_lr = args.lr or (1e-3 if args.mode == "lora" else 1e-5)
    optimizer = build_optimizer(model, peak_lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=use_scaler)
    trainable, total = count_parameters(model)
    train_model = _ddp(model, device, world)

    print(f"process {rank} of {world}; " if world > 1 else "", end="")
    print(f"model {args.model} ({base_fp}) on {device}, precision {amp_dtype or torch.float32}, mode {args.mode}")
    print(describe_trainable(model))
    print(f"data {args.data}: {len(train_examples)} train rows, dialects {include} sampled {mode}, "
          f"{sampler.num_samples_per_epoch()} samples/epoch; {len(test_examples)} test clips; audio ctx {args.audio_ctx}")
    print(f"{total_steps} steps of {args.batch_size}x{args.grad_accum} clips, lr {peak_lr:g}, run dir {run_dir}")

    # -- state, resume ----------------------------------------------------------------------------
    step, epoch, consumed, bad_in_row, skipped = 0, 0, 0, 0, 0
    history = {}
    if args.resume and ckpt.latest_checkpoint(run_dir):
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
        if state["base_fingerprint"] != base_fp:
            raise SystemExit(f"error: --resume {run_dir}: the run was trained on base {state['base_fingerprint']} but "
                             f"--model {args.model} is now {base_fp}; restore the original model file")
        if rank_hook is not None and "rank_hook" in state:
            rank_hook.load_state_dict(state["rank_hook"])
        model.load_state_dict(state["model"], strict=False)
        optimizer = build_optimizer(model, peak_lr, args.weight_decay, device)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        skipped, history = state["skipped"], json.loads(state["history"])
        ckpt.set_rng_state(state["rng"])
        print(f"resumed {run_dir} at step {step} (epoch {epoch}, {consumed} samples into it)")

    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(os.path.join(run_dir, "tb")) if is_main else NullWriter()
    log = ProgressLog(total_steps, initial=step)

    def training_state():
        # LoRA runs keep only the adapter tensors: the frozen base is reloaded from --model on resume.
        model_state = {k: v for k, v in model.state_dict().items() if args.mode == "full" or "lora_" in k}
        state = dict(model=model_state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                     step=step, epoch=epoch, consumed=consumed, skipped=skipped, rng=boundary_rng,
                     sampler=sampler.state_dict(), history=json.dumps(history), base_fingerprint=base_fp)
        if rank_hook is not None:
            state["rank_hook"] = rank_hook.state_dict()
        return state

    def keep_best(result):
        """With --eval-every: an evaluation with a new lowest macro CER saves checkpoints/best.pt (a resumable
        state) and the model as it was then, as adapter_best.safetensors (LoRA) or model_best.pt (full)."""
        cer = result.get("_macro", {}).get("cer")
        prev = history.get("best")
        if cer is None or (prev is not None and cer >= prev["macro_cer"]):
            return
        history["best"] = {"step": step, "macro_cer": cer}  # before training_state(), so a resume keeps it
        ckpt.save_checkpoint(run_dir, training_state(), step, keep_last=args.keep_last, is_best=True)
        if args.mode == "lora":
            save_adapter(model, os.path.join(run_dir, "adapter_best.safetensors"), adapter_name,
                         base_fingerprint=base_fp, metadata={"config": config, "dialect": args.dialect, "steps": step})
        else:
            export_openai(model, os.path.join(run_dir, "model_best.pt"))

    def systems():
        """What evaluation compares: the untouched base and the model being trained."""
        if args.mode == "lora":
            return {"base": lambda d: set_active_adapter(model, None),
                    "trained": lambda d: set_active_adapter(model, adapter_name)}
        return {"trained": lambda d: None}

    def evaluate(names):
        """Rank 0 evaluates while the others wait; all ranks get the same (rank 0's) results."""
        if not is_main:
            torch.distributed.barrier()
            return {n: {} for n in names}
        model.eval()
        chosen = {k: v for k, v in systems().items() if k in names}
        results, _ = evaluate_systems(model, eval_dataset, eval_collator, tokenizer, chosen, language=language,
                                      batch_size=args.eval_batch_size, beam_size=args.beam_size, device=device)
        if args.mode == "lora":
            set_active_adapter(model, adapter_name)
        model.train()
        if world > 1:
            torch.distributed.barrier()
        return results

    # -- the loop ---------------------------------------------------------------------------------
    model.train()
    boundary_rng = ckpt.rng_state()
    if step == 0 and not args.no_base_eval and not args.report_memory:
        base_results = evaluate(["base"] if args.mode == "lora" else ["trained"])
        history["base"] = base_results.get("base", base_results.get("trained"))
        _log_eval(tb, "base", history["base"], 0)
    stop = {"signal": None}
    if threading.current_thread() is threading.main_thread():  # a caller's worker thread keeps its own handling
        signal.signal(signal.SIGINT, lambda s, f: stop.update(signal="SIGINT"))
        signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal="SIGTERM"))
    t_last, samples_since, audio_since = time.time(), 0, 0.0
    t_train = time.time()
    stream = micro_batches(loader, sampler, dataset, epoch, consumed, args.batch_size * world,
                           None if args.max_steps else args.epochs)
    while step < total_steps:
        group = list(itertools.islice(stream, args.grad_accum))  # this step's micro-batches
        if not group:
            break  # the last epoch ended
        batches = [b for _, _, b in group]
        loss = accumulate(train_model, batches, autocast=autocast, scaler=scaler, spec_augment=spec_augment,
                          seed=args.seed, step=step, device=device,
                          regularizer=getattr(rank_hook, "regularizer", None), world=world)
        samples_since += sum(len(b) for b in batches)
        audio_since += sum(float(b.n_frames.sum()) for b in batches) / 100

        # -- optimizer step -----------------------------------------------------------------------
        lr = lr_at(step, total_steps, peak_lr, warmup, args.schedule)
        for group_ in optimizer.param_groups:
            group_["lr"] = lr
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p_ for p_ in model.parameters() if p_.requires_grad], args.clip if args.clip > 0 else float("inf"))
        epoch, consumed = group[-1][0], group[-1][1]  # the data position after this step
        if not math.isfinite(loss) or not torch.isfinite(grad_norm):
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            print(f"step {step}: non-finite loss/gradient ({loss}), step skipped "
                  f"({bad_in_row} in a row, {skipped} in total)")
            tb.add_scalar("train/skipped_steps", skipped, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # with fp16 this lowers the loss scale, which is often the cure
            if bad_in_row >= args.max_bad_steps:
                if is_main:
                    _save(run_dir, training_state(), step, args)
                tb.close()
                raise SystemExit(f"error: {bad_in_row} non-finite steps in a row at step {step}: lower --lr, use "
                                 f"--amp fp32 or --clip 1.0; the last good state is checkpointed in {run_dir}")
            continue
        bad_in_row = 0
        scaler.step(optimizer)
        scaler.update()
        if rank_hook is not None and rank_hook.update_and_allocate(step):
            optimizer = build_optimizer(model, peak_lr, args.weight_decay, device)  # the adapter tensors changed
            train_model = _ddp(model, device, world)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        boundary_rng = ckpt.rng_state()

        if step % args.log_every == 0:
            dt = max(time.time() - t_last, 1e-9)
            tb.add_scalar("train/loss", loss, step)
            tb.add_scalar("train/lr", lr, step)
            tb.add_scalar("train/grad_norm", float(grad_norm), step)
            tb.add_scalar("train/loss_scale", scaler.get_scale() if use_scaler else 1.0, step)
            tb.add_scalar("perf/samples_per_s", samples_since / dt, step)
            tb.add_scalar("perf/audio_s_per_s", audio_since / dt, step)
            tb.add_scalar("perf/peak_memory_mb", peak_memory_mb(device), step)
            for name, r in (rank_hook.current_ranks().items() if rank_hook is not None else ()):
                tb.add_scalar(f"rank/{name}", r, step)
            if is_main:
                log.update(step, loss, lr, samples_since / dt)
            t_last, samples_since, audio_since = time.time(), 0, 0.0

        if args.report_memory and step >= 3:
            print(f"peak memory after {step} steps: {peak_memory_mb(device):.0f} MB "
                  f"({'CUDA allocated' if device.startswith('cuda') else 'process RSS'})")
            return {}
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            history[f"step{step}"] = evaluate(["trained"])["trained"]
            _log_eval(tb, "trained", history[f"step{step}"], step)
            if is_main:
                keep_best(history[f"step{step}"])
            if on_eval is not None and is_main:
                on_eval(step, history[f"step{step}"])
        if args.save_every and step % args.save_every == 0 and is_main:
            _save(run_dir, training_state(), step, args)
        if all_sum(float(bool(stop["signal"])), world):  # any rank interrupted: all stop at this step
            if is_main:
                _save(run_dir, training_state(), step, args)
            tb.close()
            print(f"{stop['signal']}: saved step {step}; continue with: python train.py --resume {run_dir}")
            raise SystemExit(130)
    log.close()
    train_s = time.time() - t_train  # this process's loop, evaluations during it included

    # -- the result -------------------------------------------------------------------------------
    if is_main:
        _save(run_dir, training_state(), step, args)
        if args.mode == "lora":
            save_adapter(model, os.path.join(run_dir, "adapter.safetensors"), adapter_name,
                         base_fingerprint=base_fp, metadata={"config": config, "dialect": args.dialect, "steps": step})
        else:
            export_openai(model, os.path.join(run_dir, "model.pt"))
    final = evaluate(["trained"])["trained"]  # other ranks wait here for rank 0
    if not is_main:
        return {}
    _log_eval(tb, "trained", final, step)
    if args.eval_every:
        keep_best(final)
    results = {"base": history["base"], "trained": final} if "base" in history else {"trained": final}
    write_results(run_dir, results, meta={"config": config, "trainable_params": trainable, "total_params": total,
                                          "steps": step, "skipped_steps": skipped, "train_s": round(train_s, 1),
                                          "best": history.get("best"),
                                          "peak_memory_mb": round(peak_memory_mb(device)),
                                          "model_mb": round(storage_bytes(model) / 2**20, 1),
                                          "peak_memory_kind": "CUDA allocated" if device.startswith("cuda")
                                          else "process RSS"})
    tb.add_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))},
                   {"final/macro_cer": final["_macro"]["cer"]}, run_name="hparams")
    tb.close()
    print(format_table(results))
    print(f"wrote {run_dir}/results.json and results.md")
    if history.get("best"):
        print(f"best evaluation: step {history['best']['step']}, macro CER {history['best']['macro_cer']:.3f} "
              f"({'adapter_best.safetensors' if args.mode == 'lora' else 'model_best.pt'}, checkpoints/best.pt)")
    if on_eval is not None:  # last, so a caller that stops the run here still finds it complete
        on_eval(step, final)
    return results


def micro_batches(loader, sampler, dataset, epoch, consumed, batch_size, epochs):
    """Yield (epoch, consumed, batch) from (epoch, consumed) on: the data position *after* each batch.

    The sampler's order is a pure function of (seed, epoch), so a resume only needs that position.
    Batches whose clips all failed to load are passed over (their samples still count as consumed).
    """
    while epochs is None or epoch < epochs:
        sampler.set_epoch(epoch, start=consumed)
        dataset.set_epoch(epoch)
        epoch_size = sampler.num_samples_per_epoch()  # global; len(sampler) is this rank's remainder
        for batch in loader:
            consumed = min(consumed + batch_size, epoch_size)
            position = (epoch + 1, 0) if consumed >= epoch_size else (epoch, consumed)
            if batch is not None:
                yield (*position, batch)
        epoch, consumed = epoch + 1, 0


def accumulate(model, batches, *, autocast, scaler, spec_augment=None, seed=0, step=0, device="cpu",
               regularizer=None, world=1) -> float:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss.

    The loss is the mean over every target token of the step, not a mean of per-micro-batch means:
    micro-batches hold different numbers of tokens, and only this makes 4x2 equal to a batch of 8.
    Under DDP the token count is summed over ranks and the loss multiplied by the world size, since DDP
    averages gradients: 2 processes of batch B then equal one process of batch 2B.
    """
    n_tokens = max(1, all_sum(sum(int((b.targets != -100).sum()) for b in batches), world))
    total = 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        mel = batch.mel
        if spec_augment is not None and spec_augment.enabled:
            # seeded by (step, micro-step), on the CPU: the same masks after a resume and on any device
            mel = spec_augment(mel, batch.n_frames, make_generator(seed, step, i))
        # DDP: gradients are all-reduced on the last micro-step only; earlier ones just accumulate locally.
        sync = nullcontext() if world == 1 or i == len(batches) - 1 else model.no_sync()
        with sync:
            with autocast:
                logits = model(mel, batch.decoder_input)
            # flattened to [tokens, vocab]: the [B, vocab, T] layout takes a strided path 5-10x slower
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100,
                                   reduction="sum") / n_tokens
            if regularizer is not None:
                loss = loss + regularizer() / len(batches)
            scaler.scale(loss * world).backward()
        total += loss.item()
    return all_sum(total, world)


def _ddp(model, device, world):
    """The module the loop calls forward on: the model itself, or a DDP wrapper of it when world > 1."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # Only parameters that require grad are synchronised (in LoRA mode, only the adapter). The alignment-head
    # mask is a sparse buffer, which DDP cannot broadcast; it is identical on every rank anyway.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["alignment_heads"])
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def _save(run_dir, state, step, args):
    ckpt.save_checkpoint(run_dir, state, step, keep_last=args.keep_last)


def _log_eval(tb, system, result, step):
    for dialect, m in result.items():
        if not isinstance(m, dict) or dialect == "_micro":
            continue
        for metric in ("cer", "wer", "ser"):
            if m.get(metric) is not None:
                tb.add_scalar(f"eval_{system}/{dialect}/{metric}", m[metric], step)
    if "_examples" in result:
        tb.add_text(f"eval_{system}/examples", result["_examples"], step)


if __name__ == "__main__":
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except ModelSpecError as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: CUDA out of memory: lower --batch-size (keep the effective batch with --grad-accum), "
                 "add --grad-checkpointing, --freeze-encoder or --audio-ctx auto")
