"""The dialect study: every arm of the research's experiments trained by train.py, scored by evaluate.py, one report.

    python -m research.study configs/dialect_study.json --scale demo     # offline, 2 CPU cores, <= 45 min
    python -m research.study configs/dialect_study.json --scale paper    # tiny on OpenPecha, for a GPU

Each arm is one `python train.py ...` run in OUT/<arm> (its own process, so wall time and peak memory are
its own); an arm with "from" starts from that arm's model.pt. The base and the routed system (one adapter per
dialect on the mixed model, each clip decoded with the adapter of its dialect) are scored by
`python evaluate.py`. Finished steps are reused when the command is rerun with the same settings; an arm
that was interrupted is resumed from its checkpoint. The report (OUT/report/) holds report.md, report.json,
PNG plots, and a copy of every run's config.json and results.json: each number in report.json names the
file, system, dialect and metric it was read from, or the two numbers it is the difference of.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from research import report as study_report
from training.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("cer", "ser", "wer")


class StudyError(ValueError):
    """A study config or run directory that cannot be used; the message says what to do."""


# --- the recipe -----------------------------------------------------------------------------------

def load_study(path: str, scale: str) -> dict:
    """The config with `scale` chosen and every arm's train.py flags resolved; errors name the bad key."""
    try:
        with open(path, encoding="utf-8") as f:
            study = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"{path}: {e}") from None
    for key in ("target", "dialects", "scales", "arms"):
        if key not in study:
            raise StudyError(f"{path}: missing key {key!r}")
    if scale not in study["scales"]:
        raise StudyError(f"{path}: no scale {scale!r}; it has {', '.join(study['scales'])}")
    sc = study["scales"][scale]
    arms = {}
    for name, arm in study["arms"].items():
        parent = arm.get("from")
        if parent is not None and parent not in arms:
            raise StudyError(f"{path}: arm {name!r} starts from {parent!r}, which is not an arm listed before it")
        if parent is not None and study["arms"][parent]["mode"] != "full":
            raise StudyError(f"{path}: arm {name!r} starts from {parent!r}, a LoRA arm; start from a full arm")
        flags = {**sc.get("train", {}), **sc.get(arm["mode"], {}),
                 **{k: v for k, v in arm.items() if k not in ("from", "about")}}
        flags["dialect"] = str(flags["dialect"]).format(target=study["target"])
        flags.setdefault("data", sc["data"])
        arms[name] = {"from": parent, "flags": flags, "about": arm.get("about", "")}
    routed = study.get("routed")
    if routed:
        for d, a in routed["adapters"].items():
            if a not in arms or arms[a]["flags"]["mode"] != "lora" or arms[a]["from"] != routed["base"]:
                raise StudyError(f"{path}: routed adapter for {d!r} must be a LoRA arm trained from {routed['base']!r}")
    return {**study, "scale": scale, "scale_config": sc, "arms": arms}


def train_argv(study: dict, name: str, out: str) -> list[str]:
    arm = study["arms"][name]
    model = os.path.join(out, arm["from"], "model.pt") if arm["from"] else study["scale_config"]["model"]
    argv = ["--model", model, "--out", os.path.join(out, name), "--no-base-eval"]
    for k, v in arm["flags"].items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v not in (False, None):
            argv += [flag, str(v)]
    return argv


def eval_argvs(study: dict, out: str) -> dict:
    """{name: evaluate.py argv} for the base and (if configured) the routed system."""
    sc = study["scale_config"]
    common = ["--data", sc["data"]] + [a for k, v in sc.get("eval", {}).items()
                                       for a in ("--" + k.replace("_", "-"), str(v))]
    argvs = {"base": ["--model", sc["model"], "--no-routed", "--out", os.path.join(out, "eval_base"), *common]}
    routed = study.get("routed")
    if routed:
        adapters = [a for d, arm in routed["adapters"].items()
                    for a in ("--adapter", f"{d}={os.path.join(out, arm, 'adapter.safetensors')}")]
        argvs["routed"] = ["--model", os.path.join(out, routed["base"], "model.pt"), *adapters, "--systems", "routed",
                           "--out", os.path.join(out, "eval_routed"), *common]
    return argvs


# --- running, with skip-if-done -------------------------------------------------------------------

def _run(script: str, argv: list[str], log_path: str) -> dict:
    """Run `python script argv` as a child; its wall time and peak RSS are read from its own rusage."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"$ python {script} {' '.join(argv)}  (log: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:  # run from the caller's directory, so relative paths mean the same
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:  # train.py checkpoints on the SIGINT it got too; a rerun resumes
            proc.wait()
            raise
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    if rc != 0:
        raise StudyError(f"{script} {' '.join(argv)} failed (exit {rc}); see {log_path}. "
                         "Fix it and rerun the study: finished steps are kept")
    # ru_maxrss is in KiB on Linux
    return {"wall_s": round(time.time() - t0, 1), "max_rss_mb": round(usage.ru_maxrss / 1024)}


def code_version() -> str:
    """The checkout's commit (+ "-dirty" when tracked files differ), recorded with each step; "unknown" outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def _done(run_dir: str, cmd: list[str]) -> dict | None:
    """The record of a finished step run with `cmd`, None if not finished; an error if run with other settings."""
    record_path = os.path.join(run_dir, "study_step.json")
    if not os.path.isfile(record_path) or not os.path.isfile(os.path.join(run_dir, "results.json")):
        return None
    with open(record_path) as f:
        record = json.load(f)
    if record["cmd"] != cmd:
        raise StudyError(f"{run_dir} was run with other settings ({' '.join(record['cmd'])}); delete it to rerun "
                         "with the new ones, or choose another --out")
    return record


def run_step(script: str, argv: list[str], run_dir: str, log_path: str) -> dict:
    cmd = [script, *argv]
    record = _done(run_dir, cmd)
    if record is not None:
        print(f"done already: {run_dir}")
        return {**record, "reused": True}
    resume = script == "train.py" and latest_checkpoint(run_dir) is not None
    if resume:  # interrupted: train.py continues from its own latest checkpoint and config
        print(f"resuming {run_dir}")
    usage = _run(script, ["--resume", run_dir] if resume else argv, log_path)
    record = {**usage, "cmd": cmd, "resumed": resume, "code": code_version()}
    with open(os.path.join(run_dir, "study_step.json"), "w") as f:
        json.dump(record, f, indent=2)
    return {**record, "reused": False}


def run_study(study: dict, out: str, only=None) -> dict:
    steps = {}
    for name in study["arms"]:
        if only and name not in only:
            continue
        steps[name] = run_step("train.py", train_argv(study, name, out), os.path.join(out, name),
                               os.path.join(out, "logs", f"{name}.log"))
    for name, argv in eval_argvs(study, out).items():
        if only and name not in only:
            continue
        run_dir = argv[argv.index("--out") + 1]
        steps[name] = run_step("evaluate.py", argv, run_dir, os.path.join(out, "logs", f"eval_{name}.log"))
    return steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="study recipe, e.g. configs/dialect_study.json")
    p.add_argument("--scale", default="demo", help="a scale named in the recipe (demo, paper, ...)")
    p.add_argument("--out", help="study directory (default: runs/study_<scale>)")
    p.add_argument("--only", help="comma-separated arms/evaluations to run now (the report needs all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    try:
        study = load_study(args.config, args.scale)
        out = args.out or os.path.join("runs", f"study_{args.scale}")
        if args.dry_run:
            for name in study["arms"]:
                print("python train.py " + " ".join(train_argv(study, name, out)))
            for argv_ in eval_argvs(study, out).values():
                print("python evaluate.py " + " ".join(argv_))
            return {}
        t0 = time.time()
        steps = run_study(study, out, only=set(args.only.split(",")) if args.only else None)
        if args.only:
            return steps
        report = study_report.build(study, out, steps, command=["python", "-m", "research.study", *(
            sys.argv[1:] if argv is None else argv)], study_wall_s=time.time() - t0, code=code_version())
        report_dir = study_report.write(report, out)
    except StudyError as e:
        raise SystemExit(f"error: {e}") from None
    print(open(os.path.join(report_dir, "report.md"), encoding="utf-8").read())
    print(f"wrote {report_dir}/report.md, report.json and plots")
    return report


if __name__ == "__main__":
    main()
