"""Adapter files, wrong-base refusal, switching adapters, merge + openai export, PEFT export."""
import json
import re

import pytest
import torch
import whisper
from safetensors import safe_open

from lora import (AdapterMismatchError, add_lora, export_peft, list_adapters, load_adapter, lora_modules,
                  merge_and_unload, read_adapter_metadata, save_adapter, set_active_adapter)
from test_lora_layers import logits, mel_batch, randomize_lora, tiny
from whisper_ft.models import export_openai, fingerprint

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
_ATTN = {("encoder", "attn"): "self_attn", ("decoder", "attn"): "self_attn", ("decoder", "cross_attn"): "encoder_attn"}


def openai_to_hf(name: str) -> str:
    """openai-whisper module name -> transformers WhisperForConditionalGeneration module name (tests only)."""
    m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(attn|cross_attn)\.(query|key|value|out)", name)
    if m:
        return f"model.{m[1]}.layers.{m[2]}.{_ATTN[m[1], m[3]]}.{_PROJ[m[4]]}"
    m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.mlp\.(0|2)", name)
    if m:
        return f"model.{m[1]}.layers.{m[2]}.{'fc1' if m[3] == '0' else 'fc2'}"
    raise KeyError(name)


def test_openai_to_hf_map():
    assert openai_to_hf("encoder.blocks.0.attn.query") == "model.encoder.layers.0.self_attn.q_proj"
    assert openai_to_hf("decoder.blocks.0.cross_attn.value") == "model.decoder.layers.0.encoder_attn.v_proj"
    assert openai_to_hf("decoder.blocks.1.attn.out") == "model.decoder.layers.1.self_attn.out_proj"
    assert openai_to_hf("encoder.blocks.1.mlp.2") == "model.encoder.layers.1.fc2"


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    model = tiny()
    fp = fingerprint(model)
    add_lora(model, "amdo", r=4, alpha=8, rank_pattern={r"^decoder\.blocks\.1\.": 8})
    assert fingerprint(model) == fp  # LoRA tensors are not part of the base
    randomize_lora(model, "amdo")
    expected = logits(model)
    path = tmp_path / "amdo.safetensors"
    save_adapter(model, path, "amdo", base_fingerprint=fp, metadata={"config": {"lr": 1e-3, "dialect": "amdo"}})

    meta = read_adapter_metadata(path)
    assert meta["base_fingerprint"] == fp and meta["name"] == "amdo" and meta["kind"] == "lora"
    assert meta["r"] == 4 and meta["alpha"] == 8.0 and meta["rslora"] is False and meta["format_version"] == "1"
    assert len(meta["targets"]) == 12 and meta["ranks"]["decoder.blocks.1.cross_attn.value"] == 8
    assert meta["ranks"]["encoder.blocks.0.attn.query"] == 4
    assert meta["user_metadata"] == {"config": {"lr": 1e-3, "dialect": "amdo"}}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 24 and "decoder.blocks.1.attn.query.lora_B" in keys  # adapter only, no base weights

    fresh = tiny()
    assert load_adapter(fresh, path, base_fingerprint=fingerprint(fresh)) == "amdo"
    assert torch.equal(logits(fresh), expected)
    assert fresh.decoder.blocks[1].attn.query.lora_A["amdo"].shape == (8, 64)
    # under another name, into a model that already has it as "amdo"
    assert load_adapter(fresh, path, "amdo2", base_fingerprint=fp) == "amdo2"
    assert list_adapters(fresh) == ["amdo", "amdo2"]
    assert torch.equal(logits(fresh), expected)


def test_wrong_base_and_bad_files_are_refused(tmp_path):
    model = tiny()
    add_lora(model, r=2, alpha=4)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, base_fingerprint=fingerprint(model))
    other = tiny(seed=7)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(other, path, base_fingerprint=fingerprint(other))
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert fingerprint(model) in msg and fingerprint(other) in msg and str(path) in msg
    assert not lora_modules(other)  # nothing was injected before refusing

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_adapter(other, tmp_path / "missing.safetensors", base_fingerprint="x")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        read_adapter_metadata(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_adapter(tiny(), truncated, base_fingerprint=fingerprint(model))


def test_two_adapters_switch_and_none_is_the_base():
    model = tiny()
    base = logits(model)
    add_lora(model, "amdo", targets="qv", r=4, alpha=8)
    add_lora(model, "kham", targets="attn", r=2, alpha=4)
    randomize_lora(model, "amdo", seed=1)
    randomize_lora(model, "kham", seed=2)
    assert list_adapters(model) == ["amdo", "kham"]
    set_active_adapter(model, "amdo")
    out_amdo = logits(model)
    assert model.encoder.blocks[0].attn.key.active_adapter is None  # key has only "kham"
    set_active_adapter(model, "kham")
    out_kham = logits(model)
    assert not torch.allclose(out_amdo, base, atol=1e-3) and not torch.allclose(out_kham, out_amdo, atol=1e-3)
    set_active_adapter(model, None)
    assert torch.equal(logits(model), base)
    set_active_adapter(model, "amdo")
    assert torch.equal(logits(model), out_amdo)
    with pytest.raises(KeyError, match="utsang"):
        set_active_adapter(model, "utsang")


def test_merge_and_unload_then_export_loads_in_plain_whisper(tmp_path):
    model = tiny()
    add_lora(model, "amdo", targets="all-linear", r=4, alpha=8)
    add_lora(model, "kham", targets="qv", r=2, alpha=4)
    randomize_lora(model, "amdo", std=0.1)
    randomize_lora(model, "kham", std=0.1)
    set_active_adapter(model, "amdo")
    mel = mel_batch()
    expected = logits(model, mel)
    merged = merge_and_unload(model, "amdo")
    assert not lora_modules(merged) and not any("lora_" in k for k in merged.state_dict())
    assert type(merged.encoder.blocks[0].attn.query) is whisper.model.Linear
    assert type(merged.decoder.blocks[1].mlp[2]) is whisper.model.Linear
    torch.testing.assert_close(logits(merged, mel), expected, rtol=1e-5, atol=1e-5)

    path = tmp_path / "merged.pt"
    export_openai(merged, path)
    loaded = whisper.load_model(str(path), device="cpu")
    torch.testing.assert_close(logits(loaded, mel), expected, rtol=1e-5, atol=1e-5)


def test_svd_adapter_saves_loads_and_merges(tmp_path):
    model = tiny()
    add_lora(model, "ada", r=4, alpha=4, kind="svd")
    randomize_lora(model, "ada", std=0.1)
    with torch.no_grad():
        model.decoder.blocks[0].attn.query.lora_E["ada"][1:] = 0  # pruned singular values
    expected = logits(model)
    path = tmp_path / "ada.safetensors"
    save_adapter(model, path, "ada", base_fingerprint=fingerprint(model))
    assert read_adapter_metadata(path)["kind"] == "svd"
    fresh = tiny()
    load_adapter(fresh, path, base_fingerprint=fingerprint(fresh))
    assert fresh.encoder.blocks[0].attn.query.specs["ada"].kind == "svd"
    assert torch.equal(logits(fresh), expected)
    torch.testing.assert_close(logits(merge_and_unload(fresh, "ada")), expected, rtol=1e-5, atol=1e-5)


def _peft_delta(tensors, config, hf_name):
    A = tensors[f"base_model.model.{hf_name}.lora_A.weight"]
    B = tensors[f"base_model.model.{hf_name}.lora_B.weight"]
    r = config["rank_pattern"].get(re.escape(hf_name), config["r"])
    assert A.shape[0] == r
    return config["lora_alpha"] / (r ** 0.5 if config["use_rslora"] else r) * B @ A


def _read(out):
    config = json.loads((out / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors


def test_export_peft_keys_config_and_update(tmp_path):
    model = tiny()
    names = add_lora(model, "amdo", targets="attn", r=4, alpha=16, dropout=0.1,
                     rank_pattern={r"^decoder\.blocks\.1\.cross_attn": 8})
    randomize_lora(model, "amdo")
    out = tmp_path / "peft"
    export_peft(model, out, "amdo", module_name_map=openai_to_hf, base_model_name_or_path="openai/whisper-tiny")
    config, tensors = _read(out)
    assert config["peft_type"] == "LORA" and config["task_type"] is None and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.1
    assert config["use_rslora"] is False and config["base_model_name_or_path"] == "openai/whisper-tiny"
    assert config["target_modules"] == sorted(openai_to_hf(n) for n in names)
    assert config["rank_pattern"] == {re.escape(f"model.decoder.layers.1.encoder_attn.{p}"): 8
                                      for p in ("k_proj", "out_proj", "q_proj", "v_proj")}
    assert config["alpha_pattern"] == {}
    assert len(tensors) == 2 * len(names)
    key = "base_model.model.model.decoder.layers.0.encoder_attn.v_proj.lora_B.weight"
    assert tensors[key].shape == (64, 4)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(_peft_delta(tensors, config, openai_to_hf(n)), m.delta_weight("amdo"))


def test_export_peft_folds_svd_adapter_to_its_kept_rank(tmp_path):
    model = tiny()
    add_lora(model, "ada", targets="qv", r=6, alpha=12, rslora=True, kind="svd")
    randomize_lora(model, "ada")
    q = model.encoder.blocks[0].attn.query
    with torch.no_grad():
        q.lora_E["ada"][2:] = 0
    export_peft(model, tmp_path, "ada", module_name_map=openai_to_hf)
    config, tensors = _read(tmp_path)
    assert config["r"] == 6 and config["use_rslora"] is True
    assert config["rank_pattern"] == {re.escape("model.encoder.layers.0.self_attn.q_proj"): 2}
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(_peft_delta(tensors, config, openai_to_hf(n)), m.delta_weight("ada"))


def test_export_peft_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny()
    add_lora(model, "amdo", targets="all-linear", r=4, alpha=8)
    randomize_lora(model, "amdo")
    export_peft(model, tmp_path, "amdo", module_name_map=openai_to_hf)
    cfg = transformers.WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=1500,
                                     max_target_positions=448)
    hf = peft.PeftModel.from_pretrained(transformers.WhisperForConditionalGeneration(cfg), str(tmp_path))
    loaded = dict(hf.named_parameters())
    for n, m in lora_modules(model).items():
        prefix = f"base_model.model.{openai_to_hf(n)}"
        torch.testing.assert_close(loaded[f"{prefix}.lora_A.default.weight"], m.lora_A["amdo"].detach())
        torch.testing.assert_close(loaded[f"{prefix}.lora_B.default.weight"], m.lora_B["amdo"].detach())
