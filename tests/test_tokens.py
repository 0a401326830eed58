"""Added tokens (--add-tokens): exact round trips on all demo and fixture text, fewer tokens, rows that decode
like the base until trained, and that travel with adapters and model.pt (or are refused in one line)."""
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

import train
from conftest import make_tiny_model
from data.lexicon import DIALECTS, sentence_text
from data.synthetic import plan_corpus
from lora.adapters import merge_and_unload, read_adapter_metadata, save_adapter
from lora.inject import add_lora, set_active_adapter
from scoring.systems import load_systems
from training.setup import add_tokens
from whisper_ft.decoding import _decoder_hidden, audio_features_for, decode
from whisper_ft.models import ModelSpecError, export_ct2, export_openai, load_model
from whisper_ft.text import ExtendedTokenizer, normalize_text, text_units, tokenizer_for
from whisper_ft.vocab import frequent_syllables, token_report

# OpenPecha-schema rows (`uni` text, `audio_len` assumed at 4 syllables/s): tests/fixtures/make_openpecha_tibetan.py
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "openpecha_tibetan.parquet")


def fixture_rows():
    return pq.read_table(FIXTURE).to_pylist()


def demo_texts(split):
    return [sentence_text(c.words) for c in plan_corpus(300, 60, 0, DIALECTS) if c.split == split]


@pytest.fixture(scope="module")
def base_tokenizer():
    return tokenizer_for(make_tiny_model(), "bo")


def test_text_units_cover_every_character():
    for text in ["བཀྲ་ཤིས་བདེ་ལེགས། ང་བོད་པ་ཡིན།", "ཀ། །ཁ  x", "hello world", " ་།ང་། ", ""]:
        assert "".join(text_units(text)) == text


@pytest.mark.parametrize("n", [100, 500])
def test_round_trip_is_exact_on_all_demo_and_fixture_text_and_needs_fewer_tokens(base_tokenizer, n):
    fixture = [r["uni"] for r in fixture_rows()]
    for train_texts, texts in [(demo_texts("train"), demo_texts("train") + demo_texts("test")), (fixture, fixture)]:
        texts = [normalize_text(t, "bo") for t in texts]
        added = frequent_syllables([normalize_text(t, "bo") for t in train_texts], n, base_tokenizer)
        assert 0 < len(added) <= n
        ext = ExtendedTokenizer(encoding=base_tokenizer.encoding, num_languages=base_tokenizer.num_languages,
                                language="bo", task="transcribe", added=tuple(added))
        for t in texts:
            ids = ext.encode(t)
            assert ext.decode(ids) == t
            assert all(i < ext.timestamp_begin or i >= ext.timestamp_begin + 1501 for i in ids)  # never a timestamp
        before = sum(len(base_tokenizer.encode(t)) for t in texts)
        after = sum(len(ext.encode(t)) for t in texts)
        assert after < 0.6 * before, (before, after)


def test_token_report_counts_rows_over_the_decoder_context(base_tokenizer):
    rows = fixture_rows()
    examples = [type("E", (), {"text": r["uni"], "language": "bo", "duration": r["audio_len"]}) for r in rows]
    ext = ExtendedTokenizer(encoding=base_tokenizer.encoding, num_languages=base_tokenizer.num_languages,
                            language="bo", task="transcribe",
                            added=tuple(frequent_syllables([r["uni"] for r in rows], 500, base_tokenizer)))
    report = token_report(examples, {"default": base_tokenizer, "extended": ext})
    assert report["default"]["over_ctx"] == 1 and report["extended"]["over_ctx"] == 0  # the long row fits now
    assert report["extended"]["tokens_per_s"] < report["default"]["tokens_per_s"] / 2


def _lora_model_with_tokens(tokens, seed=0):
    model = make_tiny_model(seed)
    add_lora(model, "a", targets="qv", r=4)
    add_tokens(model, tokens, tokenizer_for(make_tiny_model(), "bo"), adapter="a")
    return model


def test_base_decodes_exactly_as_before_and_an_added_row_decodes_to_its_string(base_tokenizer):
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 200)
    before = decode(make_tiny_model(), mel, base_tokenizer, max_tokens=6)
    model = _lora_model_with_tokens(["བཀྲ་", "ཤིས་"])
    tok = tokenizer_for(model, "bo")
    assert isinstance(tok, ExtendedTokenizer) and model.dims.n_vocab == 51865 + 2
    set_active_adapter(model, None)  # the base: no added rows, the same tokens as before growing
    assert [h[0].tokens for h in decode(model, mel, tok, max_tokens=6)] == [h[0].tokens for h in before]
    set_active_adapter(model, "a")
    emb = model.decoder.token_embedding
    assert emb.weight.shape[0] == 51867
    with torch.no_grad():  # point the row of "ཤིས་" along the decoder's output after the prefix: it wins step 1
        h = _decoder_hidden(model, torch.tensor([tok.sot_sequence_including_notimestamps]),
                            audio_features_for(model, mel[:1]))[-1]
        emb.lora_rows["a"][1] = 100 * h / h.norm()
    hyp = decode(model, mel[:1], tok, max_tokens=1)[0][0]
    assert hyp.tokens == [51866] and hyp.text == "ཤིས་"


def test_adapter_rows_travel_in_the_file_and_through_export(tmp_path):
    model = _lora_model_with_tokens(["བཀྲ་", "ཤིས་", " བདེ་"])
    with torch.no_grad():
        model.decoder.token_embedding.lora_rows["a"].add_(1.0)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, "a", base_fingerprint="fp", metadata={"added_tokens": list(model.added_tokens)})
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("decoder.token_embedding.lora_rows").shape == (3, 64)
    assert read_adapter_metadata(path)["user_metadata"]["added_tokens"] == ["བཀྲ་", "ཤིས་", " བདེ་"]

    fresh = make_tiny_model()
    load_systems(fresh, "fp", {"a": str(path)}, {})
    assert fresh.added_tokens == ("བཀྲ་", "ཤིས་", " བདེ་")
    set_active_adapter(fresh, "a")
    assert torch.equal(fresh.decoder.token_embedding.weight, model.decoder.token_embedding.weight)
    merge_and_unload(fresh, "a")
    export_openai(fresh, tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.added_tokens == fresh.added_tokens and loaded.dims.n_vocab == 51868
    assert torch.equal(loaded.decoder.token_embedding.weight, model.decoder.token_embedding.weight)
    assert tokenizer_for(loaded, "bo").decode([51867]) == " བདེ་"
    with pytest.raises(ModelSpecError, match="--to ct2: the model has 3 added tokens.*not supported yet"):
        export_ct2(loaded, tmp_path / "ct2")


def test_adapters_with_different_added_tokens_are_one_line(tmp_path):
    for name, tokens in (("a", ["བཀྲ་"]), ("b", ["ཤིས་"])):
        model = _lora_model_with_tokens(tokens)
        save_adapter(model, tmp_path / f"{name}.safetensors", "a", base_fingerprint="fp",
                     metadata={"added_tokens": tokens})
    with pytest.raises(SystemExit, match="--adapter a and --adapter b added different tokens.*separate runs"):
        load_systems(make_tiny_model(), "fp", {n: str(tmp_path / f"{n}.safetensors") for n in "ab"}, {})


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_adds_tokens_trains_their_rows_and_saves_them(train_setup, tmp_path, capsys, mode):
    out = tmp_path / mode
    train.main(["--model", str(train_setup / "tiny.pt"), "--data", str(train_setup / "corpus"), "--out", str(out),
                "--dialect", "all", "--mode", mode, "--add-tokens", "auto:6", "--max-steps", "2", "--batch-size", "4",
                "--grad-accum", "1", "--lr", "1e-2", "--no-base-eval", "--eval-batch-size", "4"])
    printed = capsys.readouterr().out
    assert "train rows, tokens per second of audio: default" in printed and "+6 tokens (auto:6)" in printed
    base = load_model(str(train_setup / "tiny.pt")).decoder.token_embedding.weight
    if mode == "lora":
        meta = read_adapter_metadata(out / "adapter.safetensors")["user_metadata"]
        assert len(meta["added_tokens"]) == 6
        with safe_open(str(out / "adapter.safetensors"), "pt") as f:
            rows = f.get_tensor("decoder.token_embedding.lora_rows")
        tok = tokenizer_for(load_model(str(train_setup / "tiny.pt")), "bo")
        init = torch.stack([base[tok.encode(t)].mean(0) for t in meta["added_tokens"]])
        assert rows.shape == (6, 64) and not torch.allclose(rows, init)  # trained away from the mean init
    else:
        model = load_model(str(out / "model.pt"))
        assert len(model.added_tokens) == 6 and model.decoder.token_embedding.weight.shape == (51865 + 6, 64)
    results = json.loads((out / "results.json").read_text())
    assert results["trained"]["_macro"]["cer"] is not None


def test_a_bad_add_tokens_value_is_one_line():
    for value, message in (("auto:x", "expected auto:N"), ("no/such/file.txt", "no such file")):
        with pytest.raises(SystemExit, match=f"error: --add-tokens {value}: {message}"):
            train.parse_args(["--add-tokens", value])


def test_evaluate_refuses_robustness_and_mixed_vocabularies_before_any_work(tmp_path):
    import evaluate

    for name, tokens in (("a", ["བཀྲ་"]), ("b", ["ཤིས་"])):
        save_adapter(_lora_model_with_tokens(tokens), tmp_path / f"{name}.safetensors", "a", base_fingerprint="fp",
                     metadata={"added_tokens": tokens})
    a, b = (f"{n}={tmp_path / n}.safetensors" for n in "ab")
    with pytest.raises(SystemExit, match="error: --robustness with adapters that added tokens.*not supported yet"):
        evaluate.main(["--adapter", a, "--robustness", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="error: --adapter a and --adapter b added different tokens"):
        evaluate.main(["--adapter", a, "--adapter", b, "--out", str(tmp_path / "e")])


def test_rows_that_only_the_added_tokens_make_fit_are_kept(base_tokenizer):
    from data.sources import Example
    from data.validate import ValidationReport, validate_examples
    from whisper_ft.text import extend_tokenizer
    from whisper_ft.vocab import choose_tokens

    long_row = max(fixture_rows(), key=lambda r: len(r["uni"]))  # ~30 s of text: over 448 positions by default
    noise = torch.randn(16000).numpy() * 0.1
    rows = [Example("long", noise, long_row["uni"], "utsang", "bo", 1.0),
            Example("latin", noise, " ".join(f"q{i}z" for i in range(400)), "utsang", "bo", 1.0)]
    kept = validate_examples(rows, ValidationReport("t"), check_text_length=True)
    assert kept == []  # Whisper's tokenizer: both too long
    kept = validate_examples(rows, ValidationReport("t"), check_text_length=False)
    assert [e.id for e in kept] == ["long", "latin"]  # left for train.py to check with its tokenizer
    extended = extend_tokenizer(base_tokenizer, choose_tokens("auto:500", [r["uni"] for r in fixture_rows()],
                                                              base_tokenizer))
    assert [e.id for e in train.drop_over_ctx(kept, extended)] == ["long"]  # Latin gains nothing from Tibetan tokens
