"""SpeechDataset + Collator: shapes, -100 masks, auto cropping, decoded targets, dropped clips."""
import numpy as np
import pytest
import soundfile as sf
import torch

from data.collate import Batch, Collator, SpeechDataset, make_loader
from data.samplers import DialectSampler
from data.sources import Example
from whisper_ft.audio import SAMPLE_RATE, log_mel, read_audio
from whisper_ft.encoder import audio_ctx_value
from whisper_ft.text import normalize_text


def tone(seconds, f=440.0, sr=SAMPLE_RATE):
    return (0.3 * np.sin(2 * np.pi * f * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.fixture
def examples(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.23), SAMPLE_RATE)  # 123 frames
    sf.write(tmp_path / "b.wav", tone(2.5, 300, 22050), 22050)  # resampled on read: 250 frames
    return [
        Example("a", str(tmp_path / "a.wav"), "བཀྲ་ཤིས་་བདེ་ལེགས་།", "utsang", "bo"),
        Example("b", str(tmp_path / "b.wav"), "ཁྱེད་རང་ག་འདྲ་ཡོད།", "amdo", "bo"),
        Example("c", tone(0.4, 880), "ཐུགས་རྗེ་ཆེ།", "kham", "bo"),  # in-memory array, 40 frames
    ]


def test_full_context_shapes_masks_and_decoded_targets(examples, tokenizer):
    ds = SpeechDataset(examples)
    batch = Collator(tokenizer)([ds[i] for i in range(3)])
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.mel.shape == (3, 80, 3000) and batch.mel.dtype == torch.float32
    assert batch.n_frames.tolist() == [123, 250, 40]
    torch.testing.assert_close(batch.mel[0], log_mel(read_audio(examples[0].audio)))
    L = batch.decoder_input.shape[1]
    assert batch.targets.shape == (3, L) and batch.decoder_input.dtype == torch.long
    assert batch.texts[0] == "བཀྲ་ཤིས་བདེ་ལེགས།"  # normalised
    for b, ex in enumerate(examples):
        tgt, dec = batch.targets[b].tolist(), batch.decoder_input[b].tolist()
        assert dec[:4] == [tokenizer.sot, tokenizer.to_language_token("bo"), tokenizer.transcribe,
                           tokenizer.no_timestamps]
        assert tgt[:3] == [-100, -100, -100] and tgt[3] != -100
        n = len(tokenizer.encode(batch.texts[b]))
        assert all(t == -100 for t in tgt[4 + n:]) and all(t == tokenizer.eot for t in dec[4 + n:])
        assert tgt[3 + n] == tokenizer.eot  # the last real position predicts <|endoftext|>
        kept = [t for t in tgt if t != -100]
        assert tokenizer.decode(kept) == normalize_text(ex.text, "bo") + "<|endoftext|>"
        assert tgt[3:3 + n] == dec[4:4 + n]  # shifted by one
    assert batch.dialects == ["utsang", "amdo", "kham"] and batch.ids == ["a", "b", "c"]


def test_auto_and_fixed_context_crop(examples, tokenizer):
    ds = SpeechDataset(examples)
    items = [ds[i] for i in range(3)]
    auto = Collator(tokenizer, audio_ctx="auto")
    assert auto(items).mel.shape == (3, 80, 300)  # longest 250 frames -> 300
    assert auto([items[0], items[2]]).mel.shape == (2, 80, 200)  # 123 -> 200
    assert auto([items[2]]).mel.shape[-1] == 100
    full = Collator(tokenizer)(items).mel
    torch.testing.assert_close(auto(items).mel, full[..., :300])  # a crop of the same features
    fixed = Collator(tokenizer, audio_ctx=200)(items)
    assert fixed.mel.shape == (3, 80, 200) and fixed.n_frames.tolist() == [123, 200, 40]
    with pytest.raises(ValueError, match="even number of frames"):
        Collator(tokenizer, audio_ctx=201)
    with pytest.raises(ValueError, match=r"'auto', 'auto\+N' or an even int"):
        Collator(tokenizer, audio_ctx="800")  # a string where an int is meant
    margin = Collator(tokenizer, audio_ctx="auto+1500")  # the longest clip + 15 s of padding, rounded up
    assert margin(items).mel.shape == (3, 80, 1800)  # 250 + 1500 -> 1800
    assert Collator(tokenizer, audio_ctx="auto+3000")(items).mel.shape[-1] == 3000  # never past the window
    torch.testing.assert_close(margin(items).mel, full[..., :1800])


@pytest.mark.parametrize("value,parsed", [("full", "full"), ("auto", "auto"), ("auto+1500", "auto+1500"),
                                          ("800", 800), (800, 800), ("auto+0100", "auto+100")])
def test_audio_ctx_values(value, parsed):
    assert audio_ctx_value(value) == parsed


@pytest.mark.parametrize("value", ["auto+15", "auto+", "auto+-2", "123", "3002", "0", "auto-100", "half"])
def test_audio_ctx_wrong_values_are_one_line(value):
    with pytest.raises(ValueError, match=r"expected full, auto, auto\+N or an even number of frames"):
        audio_ctx_value(value)


def test_bad_clip_found_late_is_dropped_and_counted(examples, tokenizer, tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    bad = [Example("s", str(tmp_path / "silent.wav"), "ཀ", "utsang", "bo"),
           Example("n", np.full(800, np.nan, np.float32), "ཀ", "utsang", "bo"),
           Example("m", str(tmp_path / "missing.wav"), "ཀ", "utsang", "bo")]
    ds = SpeechDataset(examples[:1] + bad)
    items = [ds[i] for i in range(4)]
    assert items[1:] == [None, None, None]
    assert ds.failures == {"silent": 1, "non_finite": 1, "unreadable": 1}
    batch = Collator(tokenizer)(items)
    assert batch.ids == ["a"] and batch.dropped == 3 and batch.mel.shape[0] == 1
    assert Collator(tokenizer)([None, None]) is None


def test_wave_augment_is_reproducible_per_seed_epoch_index(examples):
    def add_noise(wav, rng):
        return wav + 0.05 * rng.standard_normal(wav.size).astype(np.float32)

    ds = SpeechDataset(examples, wave_augment=add_noise, seed=1)
    m0 = ds[0]["mel"]
    torch.testing.assert_close(ds[0]["mel"], m0)
    assert not torch.allclose(SpeechDataset(examples)[0]["mel"], m0)  # augmentation applied
    ds.set_epoch(1)
    assert not torch.allclose(ds[0]["mel"], m0)
    ds.set_epoch(0)
    torch.testing.assert_close(ds[0]["mel"], m0)


def test_make_loader_follows_the_sampler(examples, tokenizer):
    sampler = DialectSampler([e.dialect for e in examples], mode="natural", seed=0)
    loader = make_loader(SpeechDataset(examples), sampler, Collator(tokenizer, audio_ctx="auto"), batch_size=2)
    batches = list(loader)
    order = [examples[i].id for i in sampler.epoch_indices(0)]
    assert [i for b in batches for i in b.ids] == order and [len(b) for b in batches] == [2, 1]
    moved = batches[0].to("cpu")
    assert moved.mel.device.type == "cpu" and moved.texts == batches[0].texts
