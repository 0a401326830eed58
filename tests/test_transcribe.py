"""transcribe.py: long recordings cut where the speech pauses, decoded like the clips they are made of; bad files
named while the others are transcribed; valid subtitles; wrong adapters stopped with one line before decoding."""
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper

import transcribe
from conftest import make_tiny_model
from longform import boundary_errors, demo_clips, make_longform
from lora.adapters import save_adapter
from lora.inject import add_lora
from scoring.metrics import score_utterance
from transcription import longform as lf
from transcription.windows import speech_windows
from whisper_ft.audio import SAMPLE_RATE, log_mel, read_audio
from whisper_ft.decoding import Hypothesis, audio_features_for, decode, no_speech_probs
from whisper_ft.dialect_id import DialectHead, save_dialect_id
from whisper_ft.models import export_openai, fingerprint, load_model
from whisper_ft.text import tokenizer_for

ENGLISH = "tests/fixtures/english_16k.wav"
SENTENCE = "The quick brown fox jumps over the lazy dog."


# --- cutting: no model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_longform():
    return make_longform(demo_clips(), seconds=180, seed=0)


def test_the_fixture_is_seeded_over_three_minutes_with_pauses(demo_longform):
    wav, placed = demo_longform
    assert wav.size / SAMPLE_RATE >= 180 and len(placed) >= 60
    gaps = [b["start"] - a["end"] for a, b in zip(placed, placed[1:])]
    assert 0.5 <= min(gaps) and max(gaps) <= 1.5
    wav2, placed2 = make_longform(demo_clips(), seconds=180, seed=0)
    assert np.array_equal(wav, wav2) and placed == placed2
    assert make_longform(demo_clips(), seconds=180, seed=1)[1] != placed


def test_windows_fall_on_the_clip_boundaries(demo_longform):
    wav, placed = demo_longform
    windows = speech_windows(wav)
    segments = [{"start": a / SAMPLE_RATE, "end": b / SAMPLE_RATE} for a, b in windows]
    starts, ends = boundary_errors(placed, segments)
    assert len(windows) == len(placed)
    assert max(starts + ends) <= 1.0, (max(starts), max(ends))


def test_unbroken_speech_is_cut_below_30_s_at_its_quietest_point():
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(75 * SAMPLE_RATE)).astype(np.float32)
    dip = int(27.0 * SAMPLE_RATE)
    wav[dip:dip + 800] *= 0.01  # 50 ms much quieter, inside the last 5 s before the limit
    windows = speech_windows(wav)
    assert all(b - a <= 30 * SAMPLE_RATE for a, b in windows)
    assert windows[0][0] == 0 and windows[-1][1] == wav.size
    assert all(w[1] == v[0] for w, v in zip(windows, windows[1:]))  # nothing lost between windows
    assert abs(windows[0][1] / SAMPLE_RATE - 27.0) <= 0.04


def test_silence_has_no_windows():
    assert speech_windows(np.zeros(5 * SAMPLE_RATE, np.float32)) == []


# --- the decoding loop's hallucination controls, on a tiny model with decode() scripted ------------------------

def _hyp(text, looped=False, avg=-0.1):
    return Hypothesis(tokens=[1] * 3, text=text, sum_logprob=avg * 4, avg_logprob=avg, compression_ratio=1.0,
                      looped=looped)


def test_a_looped_window_is_decoded_again_with_beam_search_and_counted(monkeypatch):
    calls = []

    def fake_decode(model, mel, tokenizer, *, audio_features, beam_size, max_tokens, precision):
        calls.append((audio_features.shape[0], beam_size))
        if beam_size == 1:
            return [[_hyp("loop loop loop", looped=True)], [_hyp("fine")], [_hyp("again again", looped=True)]]
        return [[_hyp("fixed")], [_hyp("still still", looped=True)]]

    monkeypatch.setattr(lf, "decode", fake_decode)
    monkeypatch.setattr(lf, "no_speech_probs", lambda model, xa, tok: [0.0] * xa.shape[0])
    wav = np.zeros(12 * SAMPLE_RATE, np.float32)
    for s in (1, 5, 9):  # three bursts of sound, 2 s apart
        wav[s * SAMPLE_RATE:(s + 1) * SAMPLE_RATE] = 0.1 * np.sin(np.arange(SAMPLE_RATE) * 0.1)
    model = make_tiny_model()
    tr = lf.transcribe_waveform(model, wav, tokenizer_for(model, "bo"), audio_ctx="auto")
    assert calls == [(3, 1), (2, lf.FALLBACK_BEAM)]  # only the two looped windows go again
    assert (tr.windows, tr.looped_windows, tr.looped_after_fallback) == (3, 2, 1)
    assert [s.text for s in tr.segments] == ["fixed", "fine", "still still"]  # in time order
    assert [s.looped for s in tr.segments] == [False, False, True]
    assert [round(s.start) for s in tr.segments] == [1, 5, 9]


def test_a_window_is_skipped_as_no_speech_only_when_also_unlikely(monkeypatch):
    monkeypatch.setattr(lf, "decode", lambda *a, **k: [[_hyp("noise", avg=-2.0)], [_hyp("words", avg=-0.5)]])
    monkeypatch.setattr(lf, "no_speech_probs", lambda model, xa, tok: [0.9, 0.9])
    wav = np.zeros(6 * SAMPLE_RATE, np.float32)
    wav[SAMPLE_RATE:2 * SAMPLE_RATE] = wav[4 * SAMPLE_RATE:5 * SAMPLE_RATE] = 0.1
    model = make_tiny_model()
    tr = lf.transcribe_waveform(model, wav, tokenizer_for(model, "bo"), audio_ctx="auto")
    assert tr.no_speech_windows == 1 and [s.text for s in tr.segments] == ["words"]


# --- the base model on English: long-form against clip by clip, bad files, subtitles ---------------------------

@pytest.fixture(scope="module")
def base():
    return load_model("offline:base")


def test_no_speech_probs_are_whispers(base):
    wav = read_audio(ENGLISH)
    mel = torch.stack([log_mel(wav), log_mel(np.zeros(SAMPLE_RATE, np.float32))])
    ours = no_speech_probs(base, audio_features_for(base, mel), tokenizer_for(base, "en"))
    theirs = [r.no_speech_prob for r in whisper.decode(base, mel, whisper.DecodingOptions(
        language="en", without_timestamps=True, fp16=False, sample_len=1))]  # P(no speech) is read before the text
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours[0] < 0.2 < 0.6 < ours[1]  # speech, then silence


@pytest.fixture(scope="module")
def english_run(tmp_path_factory):
    """A recording of the English clip three times at other loudness with seeded pauses, transcribed."""
    d = tmp_path_factory.mktemp("english")
    clip = read_audio(ENGLISH)
    clips = []
    for i, gain in enumerate((1.0, 0.4, 0.25)):
        sf.write(d / f"clip{i}.wav", clip * gain, SAMPLE_RATE)
        clips.append({"id": f"clip{i}", "text": SENTENCE, "audio": str(d / f"clip{i}.wav")})
    wav, placed = make_longform(clips, seconds=9, seed=0)
    sf.write(d / "talk.wav", wav, SAMPLE_RATE)
    summary = transcribe.main([str(d / "talk.wav"), "--model", "offline:base", "--language", "en",
                               "--out", str(d / "out")])
    return d, placed, summary


def test_long_form_matches_clip_by_clip(english_run, base):
    d, placed, summary = english_run
    record = json.loads((d / "out" / "transcripts.jsonl").read_text().splitlines()[0])
    tok = tokenizer_for(base, "en")
    one_by_one = [decode(base, log_mel(read_audio(d / f"{c['id']}.wav"))[None], tok)[0][0].text for c in placed]
    ref = " ".join(c["text"] for c in placed)
    cer_long = score_utterance(ref, record["text"], "en")["cer"]
    cer_clips = score_utterance(ref, " ".join(one_by_one), "en")["cer"]
    assert cer_clips < 0.2  # the model does transcribe these: the comparison means something
    # not worse than the clips alone (here it is better: each window keeps up to 0.2 s of the pause before the
    # speech, and Whisper writes this clip better with a little silence ahead of it)
    assert cer_long <= cer_clips + 0.02, (record["text"], one_by_one)
    starts, ends = boundary_errors(placed, record["segments"])
    assert max(starts + ends) <= 1.0
    assert record["system"] == "base" and record["dialect"] is None and record["dialect_prob"] is None
    assert summary["transcribed"] == 1 and summary["real_time_factor"] > 0 and summary["windows"] == len(placed)


_SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)"
_VTT_TIME = _SRT_TIME.replace(",", r"\.")


def _cue_times(match) -> tuple:
    h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
    return h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000


def test_srt_and_vtt_parse_back_with_monotonic_times(english_run):
    d, placed, _ = english_run
    record = json.loads((d / "out" / "transcripts.jsonl").read_text().splitlines()[0])
    srt_blocks = (d / "out" / "talk.srt").read_text(encoding="utf-8").strip().split("\n\n")
    vtt = (d / "out" / "talk.vtt").read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n")
    vtt_blocks = vtt[len("WEBVTT\n\n"):].strip().split("\n\n")
    assert len(srt_blocks) == len(vtt_blocks) == len(record["segments"]) == len(placed)
    last = 0.0
    for i, (sb, vb, seg) in enumerate(zip(srt_blocks, vtt_blocks, record["segments"]), 1):
        index, times, text = sb.split("\n")
        start, end = _cue_times(re.fullmatch(_SRT_TIME, times))
        assert int(index) == i and text == seg["text"] and last <= start < end
        assert (start, end) == pytest.approx((seg["start"], seg["end"]), abs=1e-3)
        vtimes, vtext = vb.split("\n")
        assert _cue_times(re.fullmatch(_VTT_TIME, vtimes)) == (start, end) and vtext == text
        last = end
    lines = (d / "out" / "talk.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [s["text"] for s in record["segments"]]


def test_bad_files_are_named_and_the_others_transcribed(tmp_path, capsys):
    """Any sample rate and channel count: the good file is 44.1 kHz stereo."""
    d = tmp_path / "in"
    d.mkdir()
    import torchaudio.functional as AF

    clip = read_audio(ENGLISH)
    at_44k = AF.resample(torch.from_numpy(clip), SAMPLE_RATE, 44100).numpy()
    sf.write(d / "good.wav", np.stack([at_44k, 0.5 * at_44k], axis=1), 44100)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x02 this is not audio" * 10)
    sf.write(d / "silent.flac", np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    sf.write(d / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    (d / "notes.txt").write_text("not audio, not looked at")
    with pytest.raises(SystemExit) as e:
        transcribe.main([str(d), "--model", "offline:base", "--language", "en", "--out", str(tmp_path / "out")])
    assert e.value.code == transcribe.EXIT_SOME_FAILED != 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    reasons = {f["audio"].rsplit("/", 1)[-1]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"corrupt.wav", "silent.flac", "empty.wav"}
    assert "unreadable" in reasons["corrupt.wav"] and "silent" in reasons["silent.flac"]
    assert "empty" in reasons["empty.wav"]
    printed = capsys.readouterr()
    for name in reasons:
        assert name in printed.out + printed.err
    records = [json.loads(line) for line in (tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()]
    assert [r["audio"].rsplit("/", 1)[-1] for r in records] == ["good.wav"]
    words = records[0]["text"].lower()
    assert all(w in words for w in ("fox", "over", "lazy", "dog")), words
    assert records[0]["duration"] == pytest.approx(clip.size / SAMPLE_RATE, abs=0.01)
    assert (tmp_path / "out" / "good.srt").exists() and not (tmp_path / "out" / "corrupt.srt").exists()


# --- wrong arguments: one line, before any decoding ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    export_openai(make_tiny_model(), d / "tiny.pt")
    for name, seed in (("amdo", 0), ("kham", 0), ("other", 3)):
        model = make_tiny_model(seed)
        fp = fingerprint(model)
        add_lora(model, name, targets="qv", r=2, alpha=4)
        save_adapter(model, d / f"{name}.safetensors", name, base_fingerprint=fp, metadata={"audio_ctx": "auto"})
    sf.write(d / "a.wav", 0.1 * np.sin(np.arange(SAMPLE_RATE) * 0.2).astype(np.float32), SAMPLE_RATE)
    fp = fingerprint(make_tiny_model())
    for name in ("kham", "unsure"):  # a head that always hears kham, and one that gives each label 1/3
        save_dialect_id(_certain_head(name), d / f"head_{name}.safetensors", base_fingerprint=fp)
    save_dialect_id(_certain_head("kham"), d / "head_other.safetensors", base_fingerprint="0123456789abcdef")
    return d


def _certain_head(label):
    head = DialectHead(["amdo", "kham", "utsang"], n_state=64, n_layers=1, n_hidden=8)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        if label in head.labels:
            head.mlp[-1].bias[head.labels.index(label)] = 50.0
    return head


@pytest.fixture
def no_decoding(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("decoded before the arguments were checked")
    monkeypatch.setattr(transcribe, "transcribe_waveform", fail)


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "amdo={d}/missing.safetensors"], r"error: --adapter amdo=.*missing.safetensors: no such file"),
    (["--adapter", "other={d}/other.safetensors"], r"error: --adapter other=.*trained on base .* but this model is"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--adapter", "kham={d}/kham.safetensors"],
     r"error: several --adapter given \(amdo, kham\): .*--system NAME"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--system", "kham"], r"error: --system kham: not an --adapter name"),
    (["--format", "txt,docx"], r"error: --format txt,docx: choose from txt,jsonl,srt,vtt"),
    (["{d}/nowhere.wav"], r"error: .*nowhere.wav: no such file or directory"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--dialect-id", "{d}/nohead.safetensors"],
     r"error: --dialect-id .*nohead.safetensors: no such file"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--dialect-id", "{d}/head_other.safetensors"],
     r"error: --dialect-id: .*base"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--dialect-id", "{d}/head_kham.safetensors", "--system", "amdo"],
     r"error: --dialect-id chooses the adapter per recording: drop --system"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--route", "kham=amdo"], r"error: --route kham=amdo .*--dialect-id"),
    (["--adapter", "amdo={d}/amdo.safetensors", "--dialect-id", "{d}/head_kham.safetensors", "--route-fallback", "x"],
     r"error: --route-fallback x: expected base, mix or an --adapter name"),
])
def test_a_wrong_argument_is_one_line_before_decoding(tiny, no_decoding, extra, message):
    args = [str(tiny / "a.wav"), "--model", str(tiny / "tiny.pt"), "--out", str(tiny / "out")]
    with pytest.raises(SystemExit) as e:
        transcribe.main([x.format(d=tiny) for x in extra] + args)
    text = str(e.value.code)
    assert re.match(message, text) and "\n" not in text, text


def test_the_adapter_decodes_with_the_context_it_was_trained_with(tiny, capsys):
    summary = transcribe.main([str(tiny / "a.wav"), "--model", str(tiny / "tiny.pt"), "--out", str(tiny / "out2"),
                               "--adapter", f"amdo={tiny / 'amdo.safetensors'}", "--format", "jsonl"])
    assert summary["audio_ctx"] == "auto" and summary["system"] == "amdo"
    record = json.loads((tiny / "out2" / "transcripts.jsonl").read_text())
    assert record["system"] == "amdo" and record["windows"] == 1
    assert sorted(p.name for p in (tiny / "out2").iterdir()) == ["summary.json", "transcripts.jsonl"]
    forced = transcribe.main([str(tiny / "a.wav"), "--model", str(tiny / "tiny.pt"), "--out", str(tiny / "out3"),
                              "--adapter", f"amdo={tiny / 'amdo.safetensors'}", "--audio-ctx", "full"])
    assert forced["audio_ctx"] == "full"
    fast = transcribe.main([str(tiny / "a.wav"), "--model", str(tiny / "tiny.pt"), "--out", str(tiny / "out4"),
                            "--adapter", f"amdo={tiny / 'amdo.safetensors'}", "--audio-ctx", "auto+1500",
                            "--precision", "bf16", "--format", "jsonl"])
    assert (fast["audio_ctx"], fast["precision"]) == ("auto+1500", "bf16")
    assert json.loads((tiny / "out4" / "transcripts.jsonl").read_text())["windows"] == 1


@pytest.mark.parametrize("head, extra, system, dialect", [
    ("kham", [], "kham", "kham"),                                     # the adapter of the dialect it hears
    ("kham", ["--route", "kham=amdo"], "amdo", "kham"),               # --route maps that dialect elsewhere
    ("unsure", ["--route-threshold", "0.5", "--route-fallback", "amdo"], "amdo", "amdo"),  # 1/3 < 0.5: fallback
    ("unsure", ["--route-threshold", "0.5"], "mix", "amdo"),          # the default fallback: both adapters mixed
])
def test_dialect_id_picks_each_recordings_adapter(tiny, head, extra, system, dialect):
    out = tiny / f"routed_{head}_{len(extra)}_{system}"
    summary = transcribe.main([str(tiny / "a.wav"), "--model", str(tiny / "tiny.pt"), "--out", str(out),
                               "--adapter", f"amdo={tiny / 'amdo.safetensors'}",
                               "--adapter", f"kham={tiny / 'kham.safetensors'}",
                               "--dialect-id", str(tiny / f"head_{head}.safetensors"), "--format", "jsonl", *extra])
    record = json.loads((out / "transcripts.jsonl").read_text())
    assert summary["system"] == "auto" and record["system"] == system and record["dialect"] == dialect
    assert record["dialect_prob"] == pytest.approx(1.0 if head == "kham" else 1 / 3, abs=1e-3)
