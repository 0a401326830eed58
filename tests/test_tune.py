"""tune.py: Ray Tune drives train.main in-process, ASHA stops weak trials early, best.json is a train.py config.

The Ray test is skipped when ray is not installed (pip install -r requirements-tune.txt).
"""
import json
import os
import time

import pytest

import train


def _train_args(setup):
    # evaluated on its own training clips, so a trial that learns shows it in the CER within a few steps
    return ["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"),
            "--eval-data", str(setup / "corpus" / "train.jsonl"), "--eval-samples", "2", "--eval-batch-size", "6",
            "--dialect", "all", "--samples", "12", "--batch-size", "6", "--grad-accum", "1",
            "--lora-targets", "attn", "--warmup-steps", "1", "--schedule", "constant"]


def test_on_eval_gets_every_evaluation_in_process(train_setup, tmp_path):
    seen = []
    results = train.main([*_train_args(train_setup), "--out", str(tmp_path / "run"), "--max-steps", "4",
                          "--eval-every", "2", "--no-base-eval"], on_eval=lambda step, r: seen.append((step, r)))
    assert [s for s, _ in seen] == [2, 4]  # each periodic evaluation, then the final one
    assert seen[-1][1] == results["trained"]
    for _, r in seen:
        assert {"amdo", "kham", "utsang", "_macro"} <= set(r) and r["_macro"]["cer"] is not None


def test_tune_asha_stops_weak_trials_and_writes_a_loadable_best_config(train_setup, tmp_path):
    pytest.importorskip("ray", reason="Ray Tune is an optional extra: pip install -r requirements-tune.txt")
    import tune

    space = tmp_path / "space.json"
    # a learning rate that learns and one that barely moves, twice each (grid x 2 samples = 4 trials)
    space.write_text(json.dumps({"lr": {"grid": [1e-5, 3e-2]}, "lora_r": {"choice": [4, 8]},
                                 "lora_alpha": {"choice": [8, 16]}, "lora_dropout": {"choice": [0.0, 0.1]},
                                 "specaugment": {"choice": ["none", "LD"]}}))
    out = tmp_path / "tune"
    t0 = time.time()
    summary = tune.main(["--out", str(out), "--trials", "2", "--space", str(space), "--cpus", "2",
                         "--reduction-factor", "2", *_train_args(train_setup), "--max-steps", "16",
                         "--eval-every", "8"])
    print(f"tune: 4 trials in {time.time() - t0:.0f} s")

    # what Ray recorded for each trial (its own progress files), and what each run directory holds
    ray_dirs = [d for d in (out / "ray").iterdir() if (d / "result.json").is_file()]
    assert len(ray_dirs) == 4
    steps = {}
    for d in ray_dirs:
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        assert rows and all(r["run_dir"] == rows[0]["run_dir"] for r in rows)
        steps[rows[0]["run_dir"]] = [r["step"] for r in rows]
    stopped = [r for r, s in steps.items() if s[-1] < 16]
    finished = [r for r, s in steps.items() if s[-1] == 16]
    assert stopped, f"ASHA stopped no trial: {steps}"
    assert finished and len(stopped) + len(finished) == 4
    for run_dir in finished:
        assert os.path.isfile(os.path.join(run_dir, "results.json"))
        assert os.path.isfile(os.path.join(run_dir, "adapter.safetensors"))
    for run_dir in stopped:  # a normal run directory, cut short: config and curves, no final results
        assert os.path.isfile(os.path.join(run_dir, "config.json"))
        assert not os.path.isfile(os.path.join(run_dir, "results.json"))
    assert sum(not t["finished"] for t in summary["trials"]) == len(stopped)

    # best.json: the best finished trial's configuration, which train.py loads as a --config
    best = json.loads((out / "best.json").read_text())
    args = train.parse_args(["--config", str(out / "best.json")])
    best_trial = next(t for t in summary["trials"] if t["trial"] == summary["best"])
    assert best_trial["run_dir"] in finished
    assert best_trial["cer"] == min(t["cer"] for t in summary["trials"] if t["finished"])
    for key, value in best_trial["config"].items():
        assert best[key] == value and getattr(args, key) == value
    assert args.max_steps == 16 and args.model == str(train_setup / "tiny.pt") and args.out is None
    assert args.no_base_eval is False  # tune.py's own shortcut is not part of the recipe
    assert (out / "trials.md").read_text().count("stopped at step") == len(stopped)
