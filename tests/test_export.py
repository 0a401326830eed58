"""export.py and the writers behind it: every format loads in the runtime users load it with, and decodes as ours."""
import json
import os

import numpy as np
import pytest
import torch
import whisper

import export
from conftest import make_tiny_model
from lora.adapters import merge_and_unload
from test_evaluate import _adapter, _model
from whisper_ft import convert
from whisper_ft.decoding import decode
from whisper_ft.models import OFFLINE_PACKAGES, _ct2_parts, _part_number, export_ct2, fingerprint, load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from whisper_ft.models import export_openai

    d = tmp_path_factory.mktemp("export")
    export_openai(_model(), d / "tiny.pt")
    _adapter(_model(), "amdo", d / "amdo.safetensors", seed=1)
    _adapter(_model(), "kham", d / "kham.safetensors", seed=2)
    _adapter(_model(seed=3), "amdo", d / "other_base.safetensors", seed=1)
    return d


def _merged(setup, *adapters):
    """Our own model: the base with the adapter loaded and merged, as export.py merges it."""
    from scoring.systems import load_systems, parse_adapters

    model = load_model(str(setup / "tiny.pt"))
    files, mixes = parse_adapters(list(adapters))
    load_systems(model, fingerprint(model), files, mixes)
    if adapters:
        merge_and_unload(model, adapters[-1].partition("=")[0])
    return model


def _mel(n=2, seed=0):
    return torch.randn(n, 80, 3000, generator=torch.Generator().manual_seed(seed))


def test_ct2_writer_reproduces_the_official_converters_model_bin_byte_for_byte(tmp_path):
    # offline:base is CTranslate2's own float16 conversion of Whisper base: our reader, then our writer at
    # float16, must give back the very same file (names, order, dtypes, scalars, the tied projection alias)
    import importlib.util

    model = load_model("offline:base")
    export_ct2(model, tmp_path, "float16")
    dirs = [os.path.join(os.path.dirname(importlib.util.find_spec(p).origin), "data") for p in OFFLINE_PACKAGES["base"]]
    shipped = b"".join(open(f, "rb").read() for f in sorted((f for d in dirs for f in _ct2_parts(d)), key=_part_number))
    assert (tmp_path / "model.bin").read_bytes() == shipped
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(open(os.path.join(dirs[0], "config.json")).read())
    assert (tmp_path / "vocabulary.txt").read_text(encoding="utf-8") == open(os.path.join(dirs[0], "vocabulary.txt"),
                                                                             encoding="utf-8").read()


def test_ct2_round_trip_through_our_reader_is_exact_in_float32(setup, tmp_path):
    model = _merged(setup, f"amdo={setup / 'amdo.safetensors'}")
    export_ct2(model, tmp_path, "float32")
    back = load_model(f"ct2:{tmp_path}")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_int8_quantization_is_within_half_a_step_of_each_weight():
    w = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    q = convert.quantize_ct2({"x/weight": w, "x/bias": w[0]}, "int8")
    assert q["x/weight"].dtype == np.int8 and q["x/bias"].dtype == np.float32
    step = 1 / q["x/weight_scale"]
    assert np.all(np.abs(q["x/weight"] / q["x/weight_scale"][:, None] - w) <= step[:, None] / 2 + 1e-7)
    with pytest.raises(convert.ConversionError, match="int4"):
        convert.quantize_ct2({}, "int4")


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_ct2_export_decodes_in_ctranslate2_as_ours(setup, tmp_path, tokenizer, compute_type):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install -r requirements-export.txt")
    from faster_whisper import WhisperModel

    model = _merged(setup, f"amdo={setup / 'amdo.safetensors'}")
    export.main(["--model", str(setup / "tiny.pt"), "--adapter", f"amdo={setup / 'amdo.safetensors'}", "--to", "ct2",
                 "--out", str(tmp_path), "--quantization", compute_type])
    fw = WhisperModel(str(tmp_path), device="cpu", compute_type=compute_type, cpu_threads=1)  # as users load it
    mel = _mel()
    ours = [h[0].tokens for h in decode(model, mel, tokenizer, max_tokens=12, loop_guard=False)]
    prompt = [tokenizer.sot, tokenizer.to_language_token("bo"), tokenizer.transcribe, tokenizer.no_timestamps]
    # CTranslate2's max_length does not count as ours does: generate to the end, compare the first 12
    res = fw.model.generate(ctranslate2.StorageView.from_array(mel.numpy()), [prompt] * 2, beam_size=1,
                            max_length=448, suppress_blank=True, suppress_tokens=[-1])
    theirs = [[t for t in r.sequences_ids[0] if t < tokenizer.eot][:12] for r in res]
    if compute_type == "float32":
        assert theirs == [[t for t in o if t < tokenizer.eot] for o in ours]
    else:  # int8 weights: the first tokens agree, later ones may drift
        assert [t[:2] for t in theirs] == [[t for t in o if t < tokenizer.eot][:2] for o in ours]


def test_openai_export_loads_in_whisper_and_records_what_was_merged(setup, tmp_path):
    out = tmp_path / "m.pt"
    record = export.main(["--model", str(setup / "tiny.pt"), "--adapter", f"amdo={setup / 'amdo.safetensors'}",
                          "--to", "openai", "--out", str(out)])
    plain = whisper.load_model(str(out), device="cpu")
    ours = _merged(setup, f"amdo={setup / 'amdo.safetensors'}")
    tokens = torch.tensor([[50258, 50259, 50359, 50363]])
    with torch.no_grad():
        assert torch.allclose(plain(_mel(1), tokens), ours(_mel(1), tokens), atol=1e-5)
    meta = json.loads(torch.load(out, weights_only=True)["whisper_ft"])
    assert meta["adapter"] == "amdo" and meta["base_fingerprint"] == record["base_fingerprint"]
    assert meta["merged_fingerprint"] == fingerprint(plain) != meta["base_fingerprint"]


def test_composition_is_exported_merged(setup, tmp_path):
    a, k = f"amdo={setup / 'amdo.safetensors'}", f"kham={setup / 'kham.safetensors'}"
    export.main(["--model", str(setup / "tiny.pt"), "--adapter", a, "--adapter", k, "--adapter", "mix=amdo@0.5+kham@0.5",
                 "--to", "openai", "--out", str(tmp_path / "mix.pt")])
    merged = whisper.load_model(str(tmp_path / "mix.pt"), device="cpu").state_dict()
    base = load_model(str(setup / "tiny.pt")).state_dict()
    only_a = _merged(setup, a).state_dict()
    only_k = _merged(setup, k).state_dict()
    for key in base:  # merged weight = base + 0.5 dW_amdo + 0.5 dW_kham
        want = base[key] + 0.5 * (only_a[key] - base[key]) + 0.5 * (only_k[key] - base[key])
        assert torch.allclose(merged[key], want, atol=1e-5), key
    assert json.loads(torch.load(tmp_path / "mix.pt", weights_only=True)["whisper_ft"])["composition"]["weights"] == \
        {"amdo": 0.5, "kham": 0.5}


def test_hf_export_loads_in_a_transformers_pipeline(setup, tmp_path):
    pytest.importorskip("transformers", reason="pip install -r requirements-export.txt")
    from transformers import WhisperForConditionalGeneration, pipeline

    export.main(["--model", "offline:base", "--to", "hf", "--out", str(tmp_path)])
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "export.json"):
        assert (tmp_path / name).is_file(), name
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path), device="cpu")
    import soundfile as sf

    audio, _ = sf.read(os.path.join(os.path.dirname(__file__), "fixtures", "english_16k.wav"), dtype="float32")
    text = asr({"raw": audio, "sampling_rate": 16000}, generate_kwargs={"language": "en"})["text"]
    assert "quick brown fox" in text.lower()
    assert isinstance(WhisperForConditionalGeneration.from_pretrained(tmp_path), WhisperForConditionalGeneration)


def test_bad_exports_stop_in_one_line(setup, tmp_path, capsys):
    with pytest.raises(SystemExit, match="trained on base"):  # an adapter of another base
        export.main(["--model", str(setup / "tiny.pt"), "--adapter", f"x={setup / 'other_base.safetensors'}",
                     "--to", "ct2", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        export.main(["--model", str(setup / "tiny.pt"), "--to", "hf", "--quantization", "int8", "--out", str(tmp_path / "b")])
    assert "--quantization is for --to ct2 only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        export.main(["--model", str(setup / "tiny.pt"), "--adapter", "a=missing.safetensors", "--to", "ct2",
                     "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="not an adapter file"):
        export.main(["--model", str(setup / "tiny.pt"), "--adapter", "mix=amdo@0.5+kham@0.5", "--to", "ct2",
                     "--out", str(tmp_path / "d")])
