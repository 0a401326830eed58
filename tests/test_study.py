"""The dialect study end to end at toy scale: the real recipe's arms on tiny dims, every report number traced."""
import json
import os
import statistics

import pytest

from research import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(setup, tmp_path, **train_overrides):
    """configs/dialect_study.json with a toy scale on the tiny model and corpus."""
    with open(os.path.join(ROOT, "configs", "dialect_study.json")) as f:
        recipe = json.load(f)
    recipe["scales"]["toy"] = {
        "model": str(setup / "tiny.pt"), "data": str(setup / "corpus"),
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "audio_ctx": "auto", "eval_batch_size": 4,
                  **train_overrides},
        "full": {"lr": 1e-3}, "lora": {"lr": 1e-2}, "eval": {"audio_ctx": "auto", "batch_size": 4}}
    path = tmp_path / f"recipe{len(train_overrides)}.json"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.fixture(scope="module")
def toy_study(train_setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    recipe = _recipe(train_setup, tmp)
    out = tmp / "out"
    report = study.main([recipe, "--scale", "toy", "--out", str(out)])
    return recipe, out, report


def _check(cell, report_dir):
    """The cell's value, recomputed from the files or cells it names."""
    if "minus" in cell:
        a, b = (_check(c, report_dir) for c in cell["minus"])
        return None if a is None or b is None else a - b
    if "mean" in cell:
        values = [_check(c, report_dir) for c in cell["mean"]]
        return None if None in values else statistics.fmean(values)
    if "research" in cell:
        return cell["value"]
    with open(os.path.join(report_dir, cell["file"])) as f:
        data = json.load(f)
    if "meta" in cell:
        return data["_meta"][cell["meta"]]
    if "key" in cell:
        return data[cell["key"]]
    return data[cell["system"]][cell["dialect"]][cell["metric"]]


def test_every_number_comes_from_a_run_directory(toy_study):
    recipe, out, report = toy_study
    report_dir = out / "report"
    saved = json.loads((report_dir / "report.json").read_text())
    cells = [c for t in saved["tables"] for row in t["rows"] for c in row if isinstance(c, dict)]
    cells += [c for fd in saved["findings"] for c in fd["cells"]]
    assert len(cells) > 100
    for c in cells:
        expected = _check(c, report_dir)
        assert c["value"] == pytest.approx(expected) if expected is not None else c["value"] is None, c
    read = {c["file"] for c in cells if "file" in c}
    with open(recipe) as f:
        recipe = json.load(f)
    arms = recipe["arms"]
    assert {f"runs/{a}/results.json" for a in arms} <= read
    assert {"runs/eval_base/results.json", "runs/eval_routed/results.json"} <= read
    for a in arms:  # each run directory's own config travels with it
        config = json.loads((report_dir / "runs" / a / "config.json").read_text())
        assert config["out"] == str(out / a)
        parent = arms[a].get("from")
        assert config["model"] == (str(out / parent / "model.pt") if parent else recipe["scales"]["toy"]["model"])


def test_report_has_the_research_tables_forgetting_and_findings(toy_study):
    _, out, report = toy_study
    titles = [t["title"] for t in report["tables"]]
    for expected in ("Mixed vs single-dialect training", "Balanced fine-tuning of the single model",
                     "Full single-dialect fine-tuning of the mixed model", "LoRA single-dialect fine-tuning",
                     "Routed per-dialect adapters", "Forgetting", "LoRA rank, full fine-tuning and SpecAugment",
                     "Arms"):
        assert any(t.startswith(expected) for t in titles), (expected, titles)
    forgetting = next(t for t in report["tables"] if t["title"].startswith("Forgetting"))
    assert [r[0] for r in forgetting["rows"]] == ["single", "mixed_then_full", "mixed_then_lora_amdo",
                                                  "mixed_then_lora_kham", "mixed_then_lora_utsang", "lora_r8",
                                                  "lora_r32", "lora_r128", "lora_r32_specaugment", "routed"]
    assert len(report["findings"]) >= 9 and all(f["held"] in (True, False) for f in report["findings"])
    md = (out / "report" / "report.md").read_text()
    assert md.count("**held**") + md.count("**did not hold**") == len(report["findings"])
    paper = next(t for t in report["tables"] if t["title"].startswith("Mixed vs single"))
    assert paper["rows"][0][1]["value"] == 0.42 and "| utsang | 0.420 | 0.590 |" in md
    trainable = {r[0]: r[5]["value"] for r in report["tables"][-1]["rows"]}
    assert trainable["lora_r8"] < trainable["lora_r32"] < trainable["lora_r128"] < trainable["mixed"]
    for png in ("forgetting.png", "cer_by_system.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_finished_steps_and_resumes_an_interrupted_one(toy_study):
    recipe, out, _ = toy_study
    arm = out / "lora_r8"
    os.remove(arm / "study_step.json")  # as if the study was killed after the last checkpoint
    os.remove(arm / "results.json")
    steps = study.run_study(study.load_study(recipe, "toy"), str(out))
    assert steps["lora_r8"]["resumed"] and not steps["lora_r8"]["reused"]
    assert all(s["reused"] for name, s in steps.items() if name != "lora_r8")
    assert (arm / "results.json").is_file()


def test_changed_settings_are_refused_not_overwritten(toy_study, train_setup, tmp_path):
    _, out, _ = toy_study
    changed = _recipe(train_setup, tmp_path, seed=1)
    with pytest.raises(SystemExit, match="was run with other settings.*delete it"):
        study.main([changed, "--scale", "toy", "--out", str(out)])


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("arms"), "missing key 'arms'"),
    (lambda r: r["arms"].update(x={"from": "nope", "mode": "lora", "dialect": "amdo"}), "starts from 'nope'"),
    (lambda r: r["arms"].update(x={"from": "lora_r8", "mode": "lora", "dialect": "amdo"}), "a LoRA arm"),
])
def test_bad_recipes_are_named(tmp_path, edit, message):
    with open(os.path.join(ROOT, "configs", "dialect_study.json")) as f:
        recipe = json.load(f)
    edit(recipe)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit, match=message):
        study.main([str(path), "--dry-run"])
    with pytest.raises(SystemExit, match="no scale 'huge'"):
        study.main([os.path.join(ROOT, "configs", "dialect_study.json"), "--scale", "huge", "--dry-run"])
