"""Audio reading / log-mel against Whisper's own pipeline, Tibetan normalisation, decoder targets."""
import numpy as np
import pytest
import soundfile as sf
import torch
import whisper

from whisper_ft.audio import (HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, check_waveform,
                              log_mel, n_frames_of, read_audio, to_16k_mono)
from whisper_ft.text import (normalize_text, normalize_tibetan, prefix_tokens, resolve_language,
                             target_tokens)


def chirp(seconds=2.0, sr=SAMPLE_RATE, f0=200.0, f1=3000.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t)).astype(np.float32)


# ---- audio ----------------------------------------------------------------------------------------

def test_log_mel_matches_whisper_transcribe_window(tmp_path):
    wav = chirp(2.5)
    path = tmp_path / "chirp.wav"
    sf.write(path, wav, SAMPLE_RATE, subtype="FLOAT")
    got = log_mel(read_audio(path))
    # whisper.transcribe: mel of audio + 30 s of zeros, then the first window pad_or_trim'd to 3000 frames
    ref = whisper.pad_or_trim(whisper.log_mel_spectrogram(torch.from_numpy(wav), 80, padding=N_SAMPLES), N_FRAMES)
    assert got.shape == (80, 3000) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # and it is NOT the unpadded spectrogram (normalisation and the clip's tail differ): a stub would not notice
    plain = whisper.pad_or_trim(whisper.log_mel_spectrogram(torch.from_numpy(wav), 80), N_FRAMES)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_log_mel_sine_energy_in_right_band_and_n_frames():
    wav = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    mel = log_mel(wav, n_mels=128, n_frames=1200)
    assert mel.shape == (128, 1200)
    frames = n_frames_of(wav.size)
    assert frames == 100
    peak_bins = mel[:, 10:frames - 10].argmax(0)
    centre = peak_bins.mode().values.item()
    # 1 kHz sits near mel bin ~ 128 * mel(1000)/mel(8000) ~ 36 on Whisper's slaney scale
    assert 28 <= centre <= 44 and (peak_bins == centre).float().mean() > 0.9
    # after the real frames only the floor (max - 8 in log10, rescaled) remains
    assert torch.allclose(mel[:, frames + 2:], mel[:, frames + 2:].min().expand_as(mel[:, frames + 2:]))
    assert n_frames_of(0) == 0 and n_frames_of(HOP_LENGTH * 7 + 5) == 7 and n_frames_of(10 ** 8) == N_FRAMES


def test_read_audio_downmixes_and_resamples_stereo_44k(tmp_path):
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, left * 0.0], axis=1), sr)
    wav = read_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - int(1.5 * SAMPLE_RATE)) <= 1
    assert abs(np.abs(wav).max() - 0.2) < 0.01  # mean of the two channels
    assert to_16k_mono(np.zeros((10, 2)), SAMPLE_RATE).shape == (10,)


def test_read_audio_errors_name_the_path(tmp_path):
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not a wav file")
    with pytest.raises(AudioError, match="not_audio.wav: unreadable"):
        read_audio(bad)
    with pytest.raises(AudioError, match="missing.flac"):
        read_audio(tmp_path / "missing.flac")
    for wav, reason in [(np.zeros(0, np.float32), "empty"), (np.zeros(1600, np.float32), "silent"),
                        (np.full(1600, np.nan, np.float32), "non-finite"),
                        (np.full(N_SAMPLES + 1, 0.1, np.float32), "longer than 30 s")]:
        with pytest.raises(AudioError, match=reason):
            check_waveform(wav, "clip")
    check_waveform(chirp(1.0))  # a normal clip passes


# ---- text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("བཀྲ་ཤིས་བདེ་ལེགས།", "བཀྲ་ཤིས་བདེ་ལེགས།"),               # already normal
    ("  བཀྲ་ཤིས་་བདེ་ལེགས་།  ", "བཀྲ་ཤིས་བདེ་ལེགས།"),          # repeated tsheg, tsheg before shad, outer spaces
    ("ཀ་ ་ཁ", "ཀ་ཁ"),                                            # repeated tsheg across a space
    ("ང་།", "ང་།"),                                               # ང keeps its tsheg before shad
    ("ཁྱེད་རང་ ། ག", "ཁྱེད་རང་། ག"),                           # ... also with a space in between
    ("ཀ །ཁ", "ཀ། ཁ"),                                           # no space before shad, one after
    ("ཀ།   ཁ", "ཀ། ཁ"),                                          # spaces after shad collapse to one
    ("ཀ། །ཁ", "ཀ། ། ཁ"),                                        # shad-space-shad is kept
    ("ཀ༎ཁ", "ཀ།། ཁ"),                                            # nyis shad -> two shads
    ("ཀ༌ཁ་", "ཀ་ཁ"),                                              # non-breaking tsheg; trailing tsheg
    ("ཀ\u200b་ཁ", "ཀ་ཁ"),                                         # zero-width space removed
    ("\u0f40\u0f7a\u0f72", "\u0f40\u0f7a\u0f72"),                 # vowel signs survive (no mark -> space)
])
def test_normalize_tibetan(raw, want):
    assert normalize_tibetan(raw) == want


def test_normalize_text_per_language():
    assert normalize_text("ﾃｽﾄ です　ＡＢ", "ja") == "テストですAB"
    assert normalize_text("  Hello \t  World\n", "en") == "Hello World"
    assert normalize_text("e\u0301te", "fr") == "\u00e9te"  # NFC composes
    assert normalize_text("བཀྲ་ཤིས་་།", "bo") == "བཀྲ་ཤིས།"


def test_resolve_language(caplog):
    assert resolve_language("bo") == "bo" and resolve_language("Tibetan") == "bo"
    assert resolve_language("ja-JP") == "ja" and resolve_language("bod") == "bo"
    with pytest.raises(ValueError, match="'dz' is not one of Whisper's 100 languages.*fallback"):
        resolve_language("dz")
    with caplog.at_level("INFO"):
        assert resolve_language("dz", fallback="bo") == "bo"
    assert "dz" in caplog.text and "<|bo|>" in caplog.text
    with pytest.raises(ValueError, match="fallback 'xx'"):
        resolve_language("dz", fallback="xx")


def test_prefix_and_targets(tokenizer):
    assert prefix_tokens(tokenizer) == [tokenizer.sot, tokenizer.to_language_token("bo"),
                                        tokenizer.transcribe, tokenizer.no_timestamps]
    assert tokenizer.decode_with_timestamps(prefix_tokens(tokenizer)) == \
        "<|startoftranscript|><|bo|><|transcribe|><|notimestamps|>"
    assert prefix_tokens(tokenizer, "translate")[2] == tokenizer.translate
    text = "བཀྲ་ཤིས།"
    dec, tgt = target_tokens(tokenizer, text)
    body = tokenizer.encode(text)
    assert len(dec) == len(tgt) == 4 + len(body)
    assert tgt[:3] == [-100] * 3 and tgt[3] == body[0] and tgt[-1] == tokenizer.eot
    assert dec[4:] == body and tgt[3:-1] == dec[4:]  # shifted by one
    assert tokenizer.decode([t for t in tgt if t != -100 and t != tokenizer.eot]) == text
    en = whisper.tokenizer.get_tokenizer(multilingual=False)
    assert prefix_tokens(en) == [en.sot, en.no_timestamps]
