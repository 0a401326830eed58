"""Adapter composition (lora/compose.py): the composed update is exactly the weighted sum of the updates."""
import pytest
import torch

from lora import add_lora, lora_modules, merge_and_unload, set_active_adapter
from lora.compose import compose, parse_mix, truncate
from test_lora_layers import logits, randomize_lora, tiny


def _delta(m, name):
    A, B = m.lora_factors(name, torch.float64)
    return m.specs[name].scale * B @ A


def _two_adapters():
    model = tiny().eval()
    add_lora(model, "amdo", targets="qv", r=4, alpha=8)
    add_lora(model, "kham", targets="attn", r=2, alpha=3, rslora=True)  # other modules, rank and scaling
    randomize_lora(model, "amdo", seed=1)
    randomize_lora(model, "kham", seed=2)
    return model


def test_composed_update_is_the_weighted_sum_of_updates():
    model = _two_adapters()
    energy = compose(model, "mix", {"amdo": 0.3, "kham": 0.7})
    assert set(energy.values()) == {1.0}
    checked = 0
    for mname, m in lora_modules(model, "mix").items():
        want = sum(w * _delta(m, n) for n, w in (("amdo", 0.3), ("kham", 0.7)) if n in m.specs)
        got = _delta(m, "mix")
        assert (got - want).norm() <= 1e-5 * want.norm(), mname
        checked += 1
    assert checked == len(lora_modules(model, "kham"))  # attn covers every module qv covers, and more


def test_merged_weights_equal_base_plus_weighted_updates():
    model = _two_adapters()
    compose(model, "mix", {"amdo": 0.5, "kham": -0.25})
    want = {n: m.weight.double() + sum(w * _delta(m, a) for a, w in (("amdo", 0.5), ("kham", -0.25)) if a in m.specs)
            for n, m in lora_modules(model, "mix").items()}
    merge_and_unload(model, "mix")
    for n, w in want.items():
        got = model.get_submodule(n).weight.double()
        assert (got - w).norm() <= 1e-5 * w.norm(), n


def test_a_single_adapter_at_weight_one_decodes_bitwise_like_itself():
    model = _two_adapters()
    compose(model, "only_amdo", {"amdo": 1.0})
    set_active_adapter(model, "amdo")
    a = logits(model)
    set_active_adapter(model, "only_amdo")
    assert torch.equal(logits(model), a)


def test_truncation_keeps_the_best_rank_k_and_reports_the_energy():
    torch.manual_seed(0)
    A, B = torch.randn(6, 20), torch.randn(12, 6)
    S = torch.linalg.svdvals(B.double() @ A.double())
    A2, B2, kept = truncate(A, B, 2)
    assert A2.shape == (2, 20) and B2.shape == (12, 2)
    assert kept == pytest.approx(float((S[:2] ** 2).sum() / (S ** 2).sum()), rel=1e-9)
    err = (B @ A).double() - (B2 @ A2).double()
    assert err.norm() == pytest.approx(float(S[2:].pow(2).sum().sqrt()), rel=1e-5)  # Eckart-Young
    A6, B6, kept6 = truncate(A, B, 6)
    assert kept6 == pytest.approx(1.0) and torch.allclose(B6 @ A6, B @ A, atol=1e-4)


def test_compose_with_rank_truncates_each_module():
    model = _two_adapters()
    energy = compose(model, "mix2", {"amdo": 0.5, "kham": 0.5}, rank=2)
    assert all(m.specs["mix2"].r <= 2 for m in lora_modules(model, "mix2").values())
    assert all(0 < e <= 1 for e in energy.values()) and min(energy.values()) < 1


def test_parse_mix_and_its_errors():
    assert parse_mix("amdo@0.5+kham@0.5") == [("amdo", 0.5), ("kham", 0.5)]
    assert parse_mix("amdo+kham") == [("amdo", None), ("kham", None)]
    with pytest.raises(ValueError, match="every term a weight"):
        parse_mix("amdo@0.5+kham")
    with pytest.raises(ValueError, match="twice"):
        parse_mix("amdo+amdo")
    model = _two_adapters()
    with pytest.raises(KeyError, match="utsang"):
        compose(model, "mix", {"amdo": 0.5, "utsang": 0.5})


def test_leave_one_dialect_out_report(tmp_path):
    """research/loo.py on tiny dims: per held-out dialect, the others alone, uniform, fitted and its own adapter."""
    from conftest import make_corpus
    from research import loo
    from test_evaluate import _adapter, _model
    from whisper_ft.models import export_openai

    export_openai(_model(), tmp_path / "tiny.pt")
    for seed, d in enumerate(("utsang", "amdo", "kham"), 1):
        _adapter(_model(), d, tmp_path / f"{d}.safetensors", seed=seed)
    make_corpus(tmp_path / "corpus", n_per_dialect=2, n_test=1)
    loo.main(["--model", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "corpus"), "--fit-samples", "2",
              "--out", str(tmp_path / "loo"), "--audio-ctx", "auto", "--max-samples", "1",
              *[f"--adapter={d}={tmp_path / f'{d}.safetensors'}" for d in ("utsang", "amdo", "kham")]])
    report = (tmp_path / "loo" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| held")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["utsang", "amdo", "kham"]
    import json

    res = json.loads((tmp_path / "loo" / "kham" / "results.json").read_text())
    assert set(res) >= {"base", "utsang", "amdo", "uniform", "fitted", "own"} and "kham" not in res
    assert set(res["_meta"]["mixes"]["fitted"]["weights"]) == {"utsang", "amdo"}
