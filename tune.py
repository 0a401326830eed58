"""Hyperparameter search over train.py with Ray Tune; ASHA stops weak trials early on the validation CER.

    pip install -r requirements-tune.txt        # Ray is an optional extra
    python tune.py --trials 8 --config configs/demo.json --max-steps 100 --eval-every 20 --out tune/demo
    python train.py --config tune/demo/best.json          # the best trial's configuration, ready to run

Every flag tune.py does not define goes to train.py unchanged: it is the fixed part of each trial. A trial is
one in-process call of `train.main(argv, on_eval=...)` with its sampled `--lr --lora-r --lora-alpha
--lora-dropout --specaugment` added (`--space FILE.json` replaces that search space), and writes an ordinary
run directory OUT/runs/<trial id>. After each evaluation (every --eval-every steps, and at the end) the trial
reports the validation CER to Tune (`tune.report`): the macro average over dialects (or `--metric DIALECT`) is
what ASHA ranks, each dialect's CER is reported beside it. At each rung (the first at --grace-period steps,
then x --reduction-factor) ASHA stops a trial whose CER is worse than the best 1/reduction_factor of those
that reached the rung before it; the trial ends inside that report, so its run directory keeps its config,
TensorBoard curves and checkpoints but no results.json.
Writes OUT/best.json (the full train.py configuration of the finished trial with the lowest CER),
OUT/trials.json and OUT/trials.md (every trial: its values, steps, CER per dialect, finished or stopped), and
Ray's own records under OUT/ray.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))

# train.py flag (dest) -> distribution; --space FILE.json takes the same form
SPACE = {
    "lr": {"loguniform": [1e-4, 1e-2]},
    "lora_r": {"choice": [4, 8, 16, 32]},
    "lora_alpha": {"choice": [8, 16, 32, 64]},
    "lora_dropout": {"choice": [0.0, 0.05, 0.1]},
    "specaugment": {"choice": ["none", "LB", "LD", "adaptive"]},
}
# keys of a run's config.json that describe that one run, not a recipe
RUN_ONLY = ("argv", "world_size", "out", "resume", "config")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other flags are passed to train.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="experiment directory (default: tune_runs/<timestamp>)")
    p.add_argument("--trials", type=int, default=8, help="trials to sample (per grid point, with 'grid' entries)")
    p.add_argument("--space", default=None, help="JSON search space {flag: {choice|uniform|loguniform|grid: [...]}}")
    p.add_argument("--metric", default="_macro", help="what ASHA ranks by: _macro (CER over dialects) or a dialect")
    p.add_argument("--grace-period", type=int, default=None, help="steps before a trial can be stopped "
                                                                  "(default: --eval-every)")
    p.add_argument("--reduction-factor", type=float, default=2, help="ASHA keeps the best 1/this at each rung")
    p.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 when CUDA is available, else 0")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the sampled configurations")
    return p.parse_known_args(argv)


def build_space(spec: dict, tune) -> dict:
    """{dest: {kind: values}} -> Ray Tune's param_space."""
    kinds = {"choice": lambda v: tune.choice(v), "grid": lambda v: tune.grid_search(v),
             "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    space = {}
    for dest, dist in spec.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in kinds:
            raise SystemExit(f"error: search space entry {dest!r}: expected {{kind: values}} with kind one of "
                             f"{sorted(kinds)}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        space[dest] = kinds[kind](values)
    return space


def trial_argv(train_argv: list, config: dict, out: str) -> list:
    """train.py's argv for one trial: the fixed flags, then the sampled ones (later flags win), then --out."""
    argv = list(train_argv)
    for dest, value in sorted(config.items()):
        flag = f"--{dest.replace('_', '-')}"
        if isinstance(value, bool):  # a switch such as --rslora: present or absent
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv + ["--out", out]


def run_trial(config: dict, train_argv: list, runs_dir: str, metric: str, cwd: str) -> None:
    """One Tune trial: train.main in this process, reporting every evaluation; Tune ends it inside a report."""
    from ray import tune

    import train

    os.chdir(cwd)  # Tune starts a trial in its own directory; relative paths in the flags mean the caller's
    run_dir = os.path.join(runs_dir, tune.get_context().get_trial_id())

    def on_eval(step, result):
        dialects = {d: m["cer"] for d, m in result.items() if isinstance(m, dict) and not d.startswith("_")}
        cer = result["_macro"]["cer"] if metric == "_macro" else dialects[metric]
        tune.report({"step": step, "cer": cer, "cer_macro": result["_macro"]["cer"],
                     **{f"cer_{d}": v for d, v in dialects.items()}, "run_dir": run_dir})

    train.main(trial_argv(train_argv, config, run_dir), on_eval=on_eval)


def best_config(trials: list, train_argv: list) -> tuple[dict, dict]:
    """(the best finished trial, its run's config.json as a recipe for train.py --config)."""
    finished = [t for t in trials if t["finished"] and t["cer"] is not None]
    if not finished:
        raise SystemExit("error: no trial finished; see the trials above (errors are in the Ray logs under OUT/ray)")
    best = min(finished, key=lambda t: t["cer"])
    with open(os.path.join(best["run_dir"], "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k not in RUN_ONLY}
    if "--no-base-eval" not in train_argv:
        config["no_base_eval"] = False  # tune.py skipped the base evaluation only to save time
    return best, config


def main(argv=None) -> dict:
    args, train_argv = parse_args(argv)
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search import BasicVariantGenerator
    except ImportError:
        raise SystemExit("error: tune.py needs Ray Tune, an optional extra: pip install -r requirements-tune.txt") \
            from None
    import torch

    import train

    fixed = train.parse_args(train_argv)  # a bad train.py flag fails here, before Ray starts
    if fixed.mode != "lora":
        raise SystemExit("error: tune.py searches LoRA hyperparameters: use --mode lora")
    if not fixed.max_steps or not fixed.eval_every:
        raise SystemExit("error: tune.py needs --max-steps N and --eval-every K (K < N): ASHA compares trials at the "
                         "evaluations of equal step counts")
    if fixed.out or fixed.resume:
        raise SystemExit("error: --out is the experiment directory here; each trial gets OUT/runs/<trial>")
    spec = SPACE
    if args.space:
        with open(args.space) as f:
            spec = json.load(f)
    unknown = set(spec) - set(vars(fixed))
    if unknown:
        raise SystemExit(f"error: search space: {sorted(unknown)} are not train.py flags (use their dest names, "
                         "e.g. lora_r)")
    user_argv = list(train_argv)
    if "--no-base-eval" not in train_argv:
        train_argv = [*train_argv, "--no-base-eval"]  # the same base in every trial: not worth scoring each time
    out = os.path.abspath(args.out or os.path.join("tune_runs", time.strftime("%Y-%m-%d_%H%M%S")))
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else float(torch.cuda.is_available())

    # Ray's workers are new processes: they find train.py (and this file) through PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=args.cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
             object_store_memory=200 * 2**20)
    try:
        scheduler = ASHAScheduler(time_attr="step", max_t=fixed.max_steps,
                                  grace_period=args.grace_period or fixed.eval_every,
                                  reduction_factor=args.reduction_factor)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, train_argv=train_argv, runs_dir=runs_dir, metric=args.metric,
                                 cwd=os.getcwd()),
            {"cpu": args.cpus_per_trial, "gpu": gpus})
        tuner = tune.Tuner(trainable, param_space=build_space(spec, tune),
                           tune_config=tune.TuneConfig(metric="cer", mode="min", scheduler=scheduler,
                                                       num_samples=args.trials,
                                                       search_alg=BasicVariantGenerator(random_state=args.search_seed)),
                           run_config=tune.RunConfig(name="ray", storage_path=out, verbose=1))
        grid = tuner.fit()
    finally:
        ray.shutdown()

    trials = []
    for result in grid:
        history = result.metrics_dataframe
        last = result.metrics or {}
        trials.append({"trial": os.path.basename(last.get("run_dir", "")) or os.path.basename(result.path),
                       "config": {k: result.config[k] for k in spec}, "run_dir": last.get("run_dir"),
                       "step": last.get("step"), "cer": last.get("cer"),
                       "cer_dialects": {k.removeprefix("cer_"): v for k, v in last.items()
                                        if k.startswith("cer_") and k != "cer_macro"},
                       "evaluations": 0 if history is None else len(history),
                       "finished": last.get("step") == fixed.max_steps,
                       "error": None if result.error is None else str(result.error).splitlines()[0]})
    best, config = best_config(trials, user_argv)
    with open(os.path.join(out, "best.json"), "w") as f:
        json.dump(config, f, indent=2)
    train.parse_args(["--config", os.path.join(out, "best.json")])  # it must load as it will be used
    summary = {"metric": args.metric, "max_steps": fixed.max_steps, "best": best["trial"], "trials": trials}
    with open(os.path.join(out, "trials.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = format_trials(summary)
    with open(os.path.join(out, "trials.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    stopped = sum(not t["finished"] for t in trials)
    print(f"{len(trials)} trials, {stopped} stopped early by ASHA; best {best['trial']} (CER {best['cer']:.3f}): "
          f"python train.py --config {_short(os.path.join(out, 'best.json'))}")
    return summary


def format_trials(summary: dict) -> str:
    trials = sorted(summary["trials"], key=lambda t: (not t["finished"], t["cer"] if t["cer"] is not None else 1e9))
    keys = list(trials[0]["config"]) if trials else []
    dialects = sorted({d for t in trials for d in t["cer_dialects"]})
    head = ["trial", *keys, "steps", f"CER ({summary['metric']})", *dialects, "status"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        status = ("best" if t["trial"] == summary["best"] else "finished") if t["finished"] else \
            ("error" if t["error"] else f"stopped at step {t['step']}")
        cells = [t["trial"], *(f"{t['config'][k]:.3g}" if isinstance(t["config"][k], float) else str(t["config"][k])
                               for k in keys), str(t["step"]), _num(t["cer"]),
                 *(_num(t["cer_dialects"].get(d)) for d in dialects), status]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _short(path):
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _num(x):
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
