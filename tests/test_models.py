"""Loading, converting and exporting Whisper models: real weights, exact round trips, clear errors."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper

from conftest import make_tiny_model
from whisper_ft import convert
from whisper_ft.models import (ModelSpecError, OFFLINE_PACKAGES, export_hf, export_openai, fingerprint,
                               load_model, _load_offline)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def base():
    return load_model("offline:base")


def _offline_dir(i=0):
    import importlib.util
    return pathlib.Path(importlib.util.find_spec(OFFLINE_PACKAGES["base"][i]).origin).parent / "data"


def _logits(model, seed=0, frames=3000):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(1, model.dims.n_mels, frames, generator=g)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 1702]])
    with torch.no_grad():
        return model(mel, tokens)


def test_offline_base_transcribes_english_speech(base):
    wav, sr = sf.read(FIXTURES / "english_16k.wav", dtype="float32")
    assert sr == 16000
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(wav)), base.dims.n_mels)
    result = whisper.decode(base, mel, whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False))
    words = result.text.lower()
    for word in ("quick", "brown", "fox", "over", "lazy", "dog"):
        assert word in words, result.text
    assert base.dims.n_vocab == 51865 and base.dims.n_audio_layer == 6  # multilingual base
    assert base.alignment_heads.to_dense().sum() == 8  # read from the CTranslate2 config


def test_ct2_split_matches_fused_tensors(base):
    blob = b"".join(p.read_bytes() for p in sorted(_offline_dir(0).glob("model.bin.part*")) +
                    sorted(_offline_dir(1).glob("model.bin.part*")))
    raw, header = convert.read_ct2_model(blob)
    assert header["name"] == "WhisperSpec"
    qkv = raw["encoder/layer_2/self_attention/linear_0/weight"].float()
    sd = base.state_dict()
    assert torch.equal(sd["encoder.blocks.2.attn.query.weight"], qkv[:512])
    assert torch.equal(sd["encoder.blocks.2.attn.key.weight"], qkv[512:1024])
    assert torch.equal(sd["encoder.blocks.2.attn.value.weight"], qkv[1024:])
    kv_bias = raw["decoder/layer_1/attention/linear_1/bias"].float()
    assert torch.equal(sd["decoder.blocks.1.cross_attn.value.bias"], kv_bias[512:])
    assert torch.all(kv_bias[:512] == 0)  # the key bias CTranslate2 stores is zero: dropping it is exact


def test_ct2_to_openai_to_hf_round_trip_is_exact(base, tmp_path):
    export_hf(base, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "whisper" and cfg["d_model"] == 512 and cfg["decoder_start_token_id"] == 50258
    again = load_model(f"hf:{tmp_path / 'hf'}")
    a, b = base.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint(again) == fingerprint(base)


def test_openai_to_hf_to_openai_round_trip_is_exact(tmp_path):
    model = make_tiny_model(seed=3)
    export_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file
    hf_keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "model.decoder.layers.1.encoder_attn.v_proj.weight" in hf_keys
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in hf_keys  # Whisper keys have no bias
    back = load_model(f"hf:{tmp_path / 'hf'}")
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_pt_loads_in_plain_whisper_with_same_logits(base, tmp_path):
    path = tmp_path / "base.pt"
    export_openai(base, path)
    plain = whisper.load_model(str(path), device="cpu")
    assert torch.equal(_logits(plain), _logits(base))
    ours = load_model(str(path))
    assert fingerprint(ours) == fingerprint(base)


def test_hf_export_loads_in_transformers_if_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_tiny_model(seed=1)
    export_hf(model, tmp_path / "hf")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258, 50259, 50359, 50363]])
    with torch.no_grad():
        ref = model(mel, tokens)
        out = hf(input_features=mel, decoder_input_ids=tokens).logits
    assert torch.allclose(ref, out, atol=1e-4)


# --- bad input: one clear line each ---------------------------------------------------------------

def _message(spec):
    with pytest.raises(ModelSpecError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_spec_lists_the_forms():
    msg = _message("tinyy")
    assert "tinyy" in msg and "offline:base" in msg and "ct2:DIR" in msg


def test_unknown_offline_name():
    assert "offline:base" in _message("offline:huge")


def test_missing_directories(tmp_path):
    assert "no such directory" in _message(f"ct2:{tmp_path / 'nope'}")
    assert "no such directory" in _message(f"hf:{tmp_path / 'nope'}")
    assert "no such file" in _message(str(tmp_path / "nope.pt"))


def test_truncated_and_corrupt_model_bin(tmp_path):
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    with open(_offline_dir(0) / "model.bin.part1", "rb") as f:
        (trunc / "model.bin").write_bytes(f.read(5_000_000))
    assert "truncated" in _message(f"ct2:{trunc}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "binary version" in _message(f"ct2:{bad}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model.bin" in _message(f"ct2:{empty}")


def test_corrupt_pt(tmp_path):
    model = make_tiny_model()
    path = tmp_path / "m.pt"
    export_openai(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _message(str(path))


def test_garbage_pt_is_corrupt_not_refused(tmp_path):
    path = tmp_path / "zeros.pt"
    path.write_bytes(bytes(64))
    assert "truncated or corrupt" in _message(str(path))


def test_pt_whose_dims_do_not_match_its_weights(tmp_path):
    model = make_tiny_model()
    path = tmp_path / "m.pt"
    export_openai(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["dims"]["n_text_state"] = 32
    torch.save(ckpt, path)
    msg = _message(str(path))
    assert "do not match its dims" in msg and "n_text_state" in msg


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": _Exploit(marker)}, path)
    msg = _message(str(path))
    assert "refused" in msg and "posix.system" in msg
    assert not marker.exists()


def test_hf_directory_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert "not a Whisper model" in _message(f"hf:{tmp_path}")


def test_openai_name_offline_fails_fast_with_the_offline_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # Point the download at a closed loopback port, so the test means "offline" even on a networked machine.
    monkeypatch.setitem(whisper._MODELS, "tiny", "http://127.0.0.1:9/abc/tiny.pt")
    msg = _message("tiny")
    assert "offline:base" in msg and str(tmp_path) in msg
