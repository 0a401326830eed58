"""train.py on tiny dims: it learns, accumulation is exact, resume after SIGKILL is bitwise, failures are safe."""
import copy
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import make_corpus, make_tiny_model
from data.collate import Collator, SpeechDataset
from data.sources import load_examples
from lora.inject import add_lora, mark_only_lora_trainable
from training import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def _args(setup, out, *extra):
    return ["--model", str(setup / "tiny.pt"), "--data", str(setup / "corpus"), "--out", str(out),
            "--dialect", "all", "--eval-batch-size", "4", *map(str, extra)]


def _scalars(run_dir):
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("mode,lr", [("full", "1e-3"), ("lora", "1e-2")])
def test_loss_falls_when_overfitting_8_clips(setup, tmp_path, mode, lr):
    out = tmp_path / mode
    train.main(_args(setup, out, "--mode", mode, "--lr", lr, "--dialect", "amdo,kham", "--samples", 8,
                     "--batch-size", 8, "--grad-accum", 1, "--max-steps", 25, "--warmup-steps", 1,
                     "--schedule", "constant", "--lora-r", 8, "--lora-targets", "attn", "--no-base-eval"))
    losses = [e.value for e in _scalars(out).Scalars("train/loss")]
    assert len(losses) == 25
    assert losses[-1] < 0.5 * losses[0], losses
    results = json.loads((out / "results.json").read_text())
    assert set(results["trained"]) >= {"amdo", "kham", "utsang", "_macro"}  # every test dialect scored
    assert (out / ("adapter.safetensors" if mode == "lora" else "model.pt")).is_file()


def test_tensorboard_has_the_listed_tags(setup, tmp_path):
    out = tmp_path / "tb"
    train.main(_args(setup, out, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--eval-every", 1))
    acc = _scalars(out)
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "perf/samples_per_s",
                "perf/audio_s_per_s", "perf/peak_memory_mb", "eval_base/amdo/cer", "eval_trained/kham/cer",
                "eval_trained/_macro/cer"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("eval_") for t in acc.Tags()["tensors"])  # reference/hypothesis text pairs
    assert os.path.isdir(out / "tb" / "hparams")
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 2 and config["mode"] == "lora"


def test_tensorboard_shows_each_dialect_the_same_clips_at_every_evaluation_and_its_own_loss(setup, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_per_dialect=4, n_test=4)  # 4 test clips, 3 shown per dialect
    out = tmp_path / "tb"
    train.main(["--model", str(setup / "tiny.pt"), "--data", str(corpus), "--out", str(out), "--dialect", "all",
                "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--eval-every", "1",
                "--eval-batch-size", "4", "--audio-ctx", "auto"])
    acc = EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for dialect in ("amdo", "kham", "utsang"):
        shown = {}
        for system, steps in (("base", [0]), ("trained", [1, 2])):
            events = acc.Tensors(f"eval_{system}/examples/{dialect}/text_summary")
            assert [e.step for e in events] == steps
            for e in events:
                table = e.tensor_proto.string_val[0].decode()
                shown[e.step] = re.findall(r"^\| (test-\S+) \|", table, flags=re.M)
        assert shown[0] == shown[1] == shown[2] == [f"test-{dialect}-{i}" for i in range(3)]  # the first 3
        assert f"eval_trained/{dialect}/cer" in acc.Tags()["scalars"]
    pooled = {e.step: e.value for e in acc.Scalars("train/loss")}
    per_dialect = {t.rsplit("/", 1)[1]: {e.step: e.value for e in acc.Scalars(t)}
                   for t in acc.Tags()["scalars"] if t.startswith("train/loss/")}
    assert per_dialect and set(per_dialect) <= {"amdo", "kham", "utsang"}
    for step, loss in pooled.items():  # the pooled loss is a token-weighted mean of the dialects' losses
        values = [v[step] for v in per_dialect.values() if step in v]
        assert values and min(values) - 1e-4 <= loss <= max(values) + 1e-4
    assert any(len({v[s] for v in per_dialect.values() if s in v}) > 1 for s in pooled)  # not one number copied


def test_example_pairs_are_the_first_clips_of_each_dialect_in_table_cells():
    from scoring.evaluation import example_pairs

    records = [{"dialect": d, "id": f"{d}{i}", "ref": "a|b", "hyp": "x\ny"} for d in ("kham", "amdo") for i in range(5)]
    tables = example_pairs(records, 2)
    assert sorted(tables) == ["amdo", "kham"]
    lines = tables["kham"].split("\n")
    assert lines[2:] == ["| kham0 | a\\|b | x y |", "| kham1 | a\\|b | x y |"]  # a cell stays one cell


def test_eval_every_keeps_the_best_evaluation(setup, tmp_path):
    from safetensors.torch import load_file

    from lora.adapters import read_adapter_metadata

    out = tmp_path / "best"
    train.main(_args(setup, out, "--max-steps", 4, "--batch-size", 2, "--grad-accum", 1, "--lr", "3e-2",
                     "--eval-every", 1, "--eval-samples", 2, "--no-base-eval", "--keep-last", 1))
    cers = {e.step: e.value for e in _scalars(out).Scalars("eval_trained/_macro/cer")}
    assert sorted(cers) == [1, 2, 3, 4]  # three evaluations during the run, then the final one
    best = json.loads((out / "results.json").read_text())["_meta"]["best"]
    first_min = min(cers, key=lambda s: (cers[s], s))  # a later tie does not replace the best
    assert best["step"] == first_min and best["macro_cer"] == pytest.approx(cers[first_min], abs=1e-6)
    state = ckpt.load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["step"] == best["step"]
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["ckpt-00000004.pt"]  # keep-last 1
    meta = read_adapter_metadata(out / "adapter_best.safetensors")
    assert meta["user_metadata"]["steps"] == best["step"]
    best_tensors = load_file(out / "adapter_best.safetensors")
    final_tensors = load_file(out / "adapter.safetensors")
    for key, t in best_tensors.items():  # the adapter file is the checkpoint's LoRA state at that step
        assert torch.equal(t, state["model"][f"{key}.{meta['name']}"])
    if best["step"] != 4:  # and, unless the last step was best, not the final adapter
        assert any(not torch.equal(t, final_tensors[k]) for k, t in best_tensors.items())


def _batches(setup, sizes):
    import whisper
    examples, _ = load_examples(str(setup / "corpus"), "train")
    tok = whisper.tokenizer.get_tokenizer(True, language="bo", task="transcribe")
    ds, col = SpeechDataset(examples), Collator(tok)
    items = [ds[i] for i in range(sum(sizes))]
    out, start = [], 0
    for n in sizes:
        out.append(col(items[start:start + n]))
        start += n
    return out


def _grads(model, batches):
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.accumulate(model, batches, autocast=train.nullcontext(), scaler=scaler)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_4x2_equals_batch_8(setup):
    model = make_tiny_model()
    add_lora(model, r=4, targets="attn")
    for m in model.modules():  # a nonzero B, so gradients reach A as well
        if hasattr(m, "lora_B"):
            for p in m.lora_B.values():
                torch.nn.init.normal_(p, std=0.1)
    mark_only_lora_trainable(model)
    model.train()
    (big,) = _batches(setup, [8])
    small = _batches(setup, [4, 4])
    tokens = [int((b.targets != -100).sum()) for b in small]
    assert tokens[0] != tokens[1]  # uneven micro-batches: a mean of means would not match
    g8, g42 = _grads(model, [big]), _grads(model, small)
    assert g8.keys() == g42.keys() and len(g8) > 0
    for name in g8:
        torch.testing.assert_close(g42[name], g8[name], rtol=1e-4, atol=1e-7)


def _run(setup, out, *extra, kill_at=None):
    """Run train.py in a subprocess; with kill_at, SIGKILL it once its checkpoint for that step exists."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_at is None:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        return output
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(out)
        if latest and int(latest.rsplit("-", 1)[1].split(".")[0]) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return None


def test_resume_after_sigkill_twice_is_bitwise(setup, tmp_path):
    # LoRA with dropout, SpecAugment and speed perturbation: every source of randomness must resume exactly.
    common = ["--data", str(setup / "corpus"), "--dialect", "all", "--epochs", "3", "--batch-size", "2",
              "--grad-accum", "1", "--save-every", "1", "--lora-dropout", "0.1", "--specaugment", "LD",
              "--speed-perturb", "0.9,1.0,1.1", "--no-base-eval", "--eval-samples", "1"]
    steps_per_epoch = 6  # 12 training clips / batch 2
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(setup, ref, "--model", str(setup / "tiny.pt"), *common, "--out", str(ref))
    _run(setup, cut, "--model", str(setup / "tiny.pt"), *common, "--out", str(cut), kill_at=steps_per_epoch + 2)
    killed_at = ckpt.latest_checkpoint(cut)
    _run(setup, cut, "--resume", str(cut), kill_at=2 * steps_per_epoch + 2)
    assert ckpt.latest_checkpoint(cut) != killed_at
    _run(setup, cut, "--resume", str(cut))
    from safetensors.torch import load_file
    a, b = load_file(ref / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(cut))
    assert state["step"] == 3 * steps_per_epoch


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)}, 1)

    def dies_halfway(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a crash while writing

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"step": 2}, 2)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert torch.equal(ckpt.load_checkpoint(good)["w"], torch.ones(3))
    assert os.listdir(tmp_path / "checkpoints") == [os.path.basename(good)]  # no temp file left behind


def test_non_finite_loss_is_skipped_then_stops(setup, tmp_path, monkeypatch):
    real = train.accumulate
    calls = {"n": 0}

    def nan_once(*a, **kw):
        calls["n"] += 1
        return (float("nan"), {}) if calls["n"] == 2 else real(*a, **kw)

    monkeypatch.setattr(train, "accumulate", nan_once)
    out = tmp_path / "once"
    train.main(_args(setup, out, "--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--no-base-eval"))
    meta = json.loads((out / "results.json").read_text())["_meta"]
    assert meta["skipped_steps"] == 1 and meta["bad_steps"] == 1 and meta["scaler_skips"] == 0 and meta["steps"] == 3

    monkeypatch.setattr(train, "accumulate", lambda *a, **kw: (float("nan"), {}))
    out = tmp_path / "always"
    with pytest.raises(SystemExit) as e:
        train.main(_args(setup, out, "--max-steps", 10, "--batch-size", 2, "--max-bad-steps", 3, "--no-base-eval"))
    assert "3 bad steps in a row" in str(e.value)
    assert ckpt.latest_checkpoint(out) is not None  # the last good state is kept


def test_bad_flags_give_clear_errors(setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(_args(setup, tmp_path / "x", "--dialect", "ladakhi", "--max-steps", 1))
    assert "ladakhi" in str(e.value) and "amdo" in str(e.value)
    with pytest.raises(SystemExit) as e:  # Dzongkha has no Whisper token: the user must pick one to reuse
        train.main(_args(setup, tmp_path / "dz", "--language", "dz", "--max-steps", 1))
    assert "--language-fallback" in str(e.value)
    train.main(_args(setup, tmp_path / "dz2", "--language", "dz", "--language-fallback", "bo", "--max-steps", 1,
                     "--batch-size", 2, "--grad-accum", 1, "--no-base-eval"))
    assert json.loads((tmp_path / "dz2" / "config.json").read_text())["language_fallback"] == "bo"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1}))
    with pytest.raises(SystemExit):
        train.main(["--config", str(bad)])


def test_grad_checkpointing_gives_the_same_gradients(setup):
    from training.memory import enable_grad_checkpointing
    (batch,) = _batches(setup, [4])
    plain = make_tiny_model()
    plain.train()
    ckpt_model = copy.deepcopy(plain)
    enable_grad_checkpointing(ckpt_model)
    g1, g2 = _grads(plain, [batch]), _grads(ckpt_model, [batch])
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7)


def test_evaluation_is_never_augmented(setup, tmp_path, monkeypatch):
    import whisper
    import scoring.evaluation as ev
    seen = []
    real = ev.decode

    def spy(model, mel, *a, **kw):
        seen.append(mel.clone())
        return real(model, mel, *a, **kw)

    monkeypatch.setattr(ev, "decode", spy)
    train.main(_args(setup, tmp_path / "aug", "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1,
                     "--specaugment", "LD", "--speed-perturb", "0.9,1.1", "--noise-snr", "5,10", "--aug-p", 1,
                     "--no-base-eval"))
    examples, _ = load_examples(str(setup / "corpus"), "test")
    tok = whisper.tokenizer.get_tokenizer(True, language="bo", task="transcribe")
    clean = [b for _, b in ev.eval_batches(SpeechDataset(examples), Collator(tok), 4)]
    assert len(seen) == len(clean) > 0
    for got, want in zip(seen, clean):
        assert torch.equal(got, want.mel)


def test_sigint_saves_a_resumable_checkpoint(setup, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *_args(setup, out, "--epochs", 4, "--batch-size", 2,
                                                                  "--grad-accum", 1, "--no-base-eval")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "tb").exists():
        time.sleep(0.05)
    time.sleep(1.0)  # into the loop
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "--resume" in output
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert 0 < saved["step"] < 24
    assert saved["train_s"] > 0  # the time before the interruption counts in the resumed run's train_s
    with pytest.raises(SystemExit) as e:  # starting over the same directory would lose it
        train.main(_args(setup, out, "--max-steps", 1))
    assert "--resume" in str(e.value)
    _run(setup, out, "--resume", str(out))
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert final["step"] == 24 and final["train_s"] > saved["train_s"]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--lora-r", "0"], "--lora-r 0: must be a positive integer"),
    (["--lora-dropout", "1.5"], "--lora-dropout 1.5: must be in [0, 1)"),
    (["--audio-ctx", "banana"], "--audio-ctx 'banana': expected full, auto, auto+N"),
    (["--mode", "lora", "--freeze-encoder"], "--freeze-encoder is for --mode full"),
    (["--mode", "full", "--base-8bit"], "--base-8bit is for --mode lora only"),
])
def test_values_no_run_can_use_are_one_line_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_args(flags)


def test_values_from_a_config_file_are_checked_too(tmp_path):
    (tmp_path / "c.json").write_text('{"grad_accum": 0}')
    with pytest.raises(SystemExit, match="--grad-accum 0: must be a positive integer"):
        train.parse_args(["--config", str(tmp_path / "c.json")])


def test_a_missing_manifest_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: .*nowhere.jsonl"):
        train.main(["--data", str(tmp_path / "nowhere.jsonl"), "--model", "offline:base", "--out", str(tmp_path / "r")])


class _Scaler:
    """A GradScaler stand-in: fp16 loss scaling that halves its scale on every update after an overflow."""

    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale

    def update(self, new_scale=None):
        self.scale = self.scale / 2 if new_scale is None else new_scale


def _run_for_skips(tmp_path, scale):
    from types import SimpleNamespace

    return SimpleNamespace(scaler=_Scaler(scale), optimizer=SimpleNamespace(zero_grad=lambda **kw: None),
                           tb=SimpleNamespace(add_scalar=lambda *a: None, close=lambda: None),
                           args=SimpleNamespace(max_bad_steps=3), run_dir=str(tmp_path), is_main=False)


def test_fp16_overflows_while_the_scale_falls_do_not_abort_a_healthy_run(tmp_path):
    from training.state import TrainState

    run, state = _run_for_skips(tmp_path, 65536.0), TrainState()
    for _ in range(10):  # ten overflows in a row with a finite loss: the scaler's own business
        train.skip_step(run, state, 2.5)
    assert state.skipped == state.scaler_skips == 10 and state.bad_in_row == 0 and run.scaler.scale == 64.0
    with pytest.raises(SystemExit, match="3 bad steps in a row"):
        for _ in range(3):  # a non-finite loss is bad at any scale
            train.skip_step(run, state, float("nan"))
    assert state.scaler_skips == 10 and state.skipped == 13
    run, state = _run_for_skips(tmp_path, 2.0), TrainState()
    train.skip_step(run, state, 2.5)  # 2 -> 1: the scale still fell
    assert (state.scaler_skips, state.bad_in_row, run.scaler.scale) == (1, 0, train.SCALE_FLOOR)
    with pytest.raises(SystemExit, match="3 bad steps in a row"):  # overflows that persist at the floor
        for _ in range(3):
            train.skip_step(run, state, 2.5)
            assert run.scaler.scale == train.SCALE_FLOOR  # held there, not halved towards zero


def test_resume_refuses_a_flag_that_would_change_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": "demo", "lr": 0.002, "max_steps": 10, "seed": 0}))
    with pytest.raises(SystemExit, match="--data demo.*drop --data"):
        train.parse_args(["--resume", str(run), "--data", "other.jsonl"])
    args = train.parse_args(["--resume", str(run), "--max-steps", "20", "--seed", "0"])  # same value: fine
    assert args.max_steps == 20 and args.data == "demo" and args.resume == str(run)


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path):
    from training.rundir import open_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": "demo", "batch_size": 8, "world_size": 2}))
    args = train.parse_args(["--resume", str(run)])
    with pytest.raises(SystemExit, match="global batch was 16 .* pass --batch-size 16"):
        open_run_dir(args, [], world=1, is_main=True)  # one process of 8 would see half the batch
    args = train.parse_args(["--resume", str(run), "--batch-size", "16"])
    run_dir, config = open_run_dir(args, [], world=1, is_main=True)
    assert config["batch_size"] == 16 and "resumed_global_batch" not in config


# ---- fp16 on the CPU with a real GradScaler -----------------------------------------------------------

def _fp16_run(setup, out, monkeypatch, *extra, init_scale=None, hook=None):
    """train.main with --amp fp16 on the CPU: torch.autocast(float16) and a real torch.amp.GradScaler("cpu"),
    optionally starting at `init_scale` and with `hook` registered as a forward hook on the decoder."""
    if init_scale is not None:
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init_scale))
    if hook is not None:
        load_base = train.load_base

        def with_hook(*a, **kw):
            model, fp = load_base(*a, **kw)
            model.decoder.register_forward_hook(hook)
            return model, fp

        monkeypatch.setattr(train, "load_base", with_hook)
    return train.main(_args(setup, out, "--amp", "fp16", "--device", "cpu", "--batch-size", 2, "--grad-accum", 1,
                            "--audio-ctx", "auto", "--no-base-eval", "--eval-samples", 1, *extra))


def _scaler_skips(printed):
    """[(step, loss scale)] of the scaler skips train.py printed."""
    return [(int(step), float(scale)) for step, scale in
            re.findall(r"step (\d+): fp16 gradient overflow at loss scale (\S+): scaler skip", printed)]


def test_fp16_on_cpu_overflows_are_scaler_skips_not_bad_steps(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fp16"
    # 2^24 / (tokens of a step) is far above fp16's 65504 at an untrained model's loss: the first backward
    # overflows, and the scale must fall before a step is taken
    _fp16_run(setup, out, monkeypatch, "--max-steps", 3, init_scale=2.0 ** 24)
    printed = capsys.readouterr().out
    assert "precision torch.float16" in printed
    skips = _scaler_skips(printed)
    scales = [scale for _, scale in skips]
    assert skips[0] == (0, 2.0 ** 24) and len(skips) >= 2, printed
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]))  # halved at each skip (good steps do not grow it)
    assert "in a row" not in printed  # no bad step
    meta = json.loads((out / "results.json").read_text())["_meta"]
    assert meta["steps"] == 3 and meta["bad_steps"] == 0
    assert meta["scaler_skips"] == meta["skipped_steps"] == len(scales)
    acc = _scalars(out)
    assert [e.value for e in acc.Scalars("train/scaler_skips")] == list(range(1, len(scales) + 1))
    assert {e.value for e in acc.Scalars("train/bad_steps")} == {0}
    trained_at = [e.value for e in acc.Scalars("train/loss_scale")]
    first_step_scale = [scale for step, scale in skips if step == 0][-1] / 2
    assert len(trained_at) == 3 and trained_at[0] == first_step_scale  # the scale the first good step ran at
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/loss"))


def test_fp16_on_cpu_bad_steps_still_stop_the_run(setup, tmp_path, monkeypatch, capsys):
    def nan_logits(module, inputs, logits):
        return logits * float("nan")

    with pytest.raises(SystemExit, match="3 bad steps in a row"):  # a non-finite loss is bad at any scale
        _fp16_run(setup, tmp_path / "nan", monkeypatch, "--max-steps", 10, "--max-bad-steps", 3, hook=nan_logits)
    printed = capsys.readouterr().out
    assert printed.count("non-finite loss (nan)") == 3 and not _scaler_skips(printed)
    assert ckpt.latest_checkpoint(tmp_path / "nan") is not None

    def inf_gradient(module, inputs, logits):  # a finite loss whose gradient overflows at every scale
        logits.register_hook(lambda g: torch.full_like(g, float("inf")))

    monkeypatch.undo()
    with pytest.raises(SystemExit, match="3 bad steps in a row"):
        _fp16_run(setup, tmp_path / "floor", monkeypatch, "--max-steps", 10, "--max-bad-steps", 3,
                  init_scale=4.0, hook=inf_gradient)
    printed = capsys.readouterr().out
    assert _scaler_skips(printed) == [(0, 4.0), (0, 2.0)]  # the scale falls to the floor; skips there are bad
    assert printed.count(f"fp16 gradient overflow at the loss-scale floor {train.SCALE_FLOOR:g}") == 3
