"""Leave one dialect out: can the other dialects' adapters, composed, stand in for a dialect without an adapter?

    python -m research.loo --adapter amdo=runs/amdo --adapter kham=runs/kham --adapter utsang=runs/utsang \
        --data demo --fit-samples 20 --out runs/loo

For each dialect d with an adapter, evaluate.py scores on d's test clips: the base; each other adapter alone; their
uniform composition; their composition fitted on --fit-samples labelled clips of d from the train split
(lora/compose.py, scoring/systems.fit_mix); and d's own adapter, the upper bound a composition cannot see.
Writes OUT/<d>/ (evaluate.py's files) and OUT/report.md, a table of CER per system with the fitted weights.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_argv(adapters: dict, held_out: str, args) -> list[str]:
    others = [n for n in adapters if n != held_out]
    argv = ["--model", args.model, "--data", args.data, "--dialect", held_out, "--no-routed",
            "--out", os.path.join(args.out, held_out), "--fit-data", args.data, "--fit-samples", str(args.fit_samples)]
    for name in others:
        argv += ["--adapter", f"{name}={adapters[name]}"]
    argv += ["--adapter", "uniform=" + "+".join(f"{n}@{1 / len(others):g}" for n in others),
             "--adapter", "fitted=" + "+".join(others), "--adapter", f"own={adapters[held_out]}"]
    return argv + args.extra


def report(adapters: dict, args, wall: dict) -> str:
    lines = ["# Leave one dialect out: composed adapters for a dialect without one", "",
             f"Command: `python -m research.loo {' '.join(sys.argv[1:])}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}. CER on each held-out dialect's test clips (micro); `fitted` "
             f"is fitted on {args.fit_samples} clips of that dialect from the train split; `own` is the held-out "
             "dialect's own adapter (not available in the setting this simulates). Files: `<dialect>/results.json`.",
             "", "| held out | base | " + " | ".join(f"{n} alone" for n in adapters) + " | uniform | fitted | own | fitted weights | s |",
             "|" + "---|" * (len(adapters) + 7)]
    for d in adapters:
        with open(os.path.join(args.out, d, "results.json")) as f:
            res = json.load(f)
        cell = lambda s: f"{res[s][d]['cer']:.3f}" if s in res else "-"  # noqa: E731
        weights = res["_meta"]["mixes"]["fitted"]["weights"]
        lines.append(f"| {d} | {cell('base')} | " + " | ".join(cell(n) for n in adapters) + f" | {cell('uniform')} | "
                     f"{cell('fitted')} | {cell('own')} | " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())
                     + f" | {wall[d]:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="offline:base")
    p.add_argument("--adapter", action="append", required=True, metavar="DIALECT=PATH",
                   help="one adapter per dialect, named after it; at least three")
    p.add_argument("--data", default="demo")
    p.add_argument("--fit-samples", type=int, default=20)
    p.add_argument("--out", required=True)
    args, extra = p.parse_known_args(argv)
    args.extra = extra  # anything else goes to evaluate.py (e.g. --max-samples)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if len(adapters) < 3:
        raise SystemExit("error: leave-one-out composes the others: give at least three --adapter DIALECT=PATH")
    os.makedirs(args.out, exist_ok=True)
    wall = {}
    for d in adapters:
        t0 = time.time()
        cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), *eval_argv(adapters, d, args)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        with open(os.path.join(args.out, f"{d}.log"), "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"error: evaluate.py failed for held-out {d}; see {args.out}/{d}.log")
        wall[d] = time.time() - t0
    text = report(adapters, args, wall)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
