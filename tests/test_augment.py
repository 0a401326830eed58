import argparse

import numpy as np
import pytest
import soundfile

from training.augment import (WaveAugment, WaveAugmentConfig, add_augment_args, augment_from_args, pink_noise,
                                pitch_shift, speed_perturb)

SR = 16000


def sine(freq=440.0, seconds=2.0, amplitude=0.5):
    t = np.arange(int(SR * seconds)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(wav):
    """Peak of the Hann-windowed spectrum, refined by a parabola through the log magnitudes."""
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav)))) + 1e-12
    k = int(np.argmax(spectrum))
    a, b, c = np.log(spectrum[k - 1:k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / len(wav)


def snr_db(clean, noisy):
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean).astype(np.float64) ** 2))


@pytest.mark.parametrize("factor", [0.9, 1.1, 0.95])
def test_speed_perturbation_scales_duration_and_frequency(factor):
    wav = sine(440)
    out = speed_perturb(wav, factor)
    assert out.dtype == np.float32
    assert abs(len(out) - len(wav) / factor) <= 1  # still 16 kHz: 1/factor as many samples
    assert dominant_frequency(out) / 440 == pytest.approx(factor, rel=1e-3)


@pytest.mark.parametrize("semitones", [2.0, -2.0, 3.5, -0.7])
def test_pitch_shift_keeps_duration_and_moves_frequency(semitones):
    wav = sine(440)
    out = pitch_shift(wav, semitones)
    assert len(out) == len(wav) and out.dtype == np.float32
    # 0.3 % is the most the 100 Hz rate rounding can cost; 1 % leaves room for the phase vocoder
    middle = out[2000:-2000]  # the STFT edges are not stationary
    assert dominant_frequency(middle) / 440 == pytest.approx(2 ** (semitones / 12), rel=0.01)


def twin_draw(augment, wav, seed):
    """The parameters __call__ draws for this seed, and its output."""
    return augment.sample(np.random.default_rng(seed)), augment(wav, np.random.default_rng(seed))


@pytest.mark.parametrize("seed", range(6))
def test_generated_noise_has_the_requested_snr(seed):
    wav = sine(300, amplitude=0.1)  # quiet, so the peak limiter never rescales
    augment = WaveAugment(WaveAugmentConfig(noise_snr=(0.0, 30.0)))
    choice, out = twin_draw(augment, wav, seed)
    assert choice.noise in ("white", "pink") and 0 <= choice.snr_db <= 30
    assert np.abs(out).max() <= 1.0
    assert snr_db(wav, out) == pytest.approx(choice.snr_db, abs=0.5)


def test_pink_noise_falls_3_db_per_octave():
    power = np.abs(np.fft.rfft(pink_noise(2 ** 16, np.random.default_rng(0)))) ** 2
    band = lambda lo: power[lo:2 * lo].mean()  # one octave
    assert 10 * np.log10(band(1000) / band(2000)) == pytest.approx(3.0, abs=0.5)


def test_noise_files_are_cropped_or_looped_at_the_requested_snr(tmp_path):
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "short.wav", rng.standard_normal(2400).astype(np.float32) * 0.1, 8000)  # 0.3 s, loops
    soundfile.write(tmp_path / "long.flac", rng.standard_normal((3 * SR, 2)) * 0.1, SR)  # 3 s stereo, cropped
    augment = WaveAugment(WaveAugmentConfig(noise_snr=(5.0, 20.0), noise_dir=str(tmp_path)))
    assert [p.rsplit("/", 1)[1] for p in augment.noise_files] == ["long.flac", "short.wav"]
    wav = sine(300, amplitude=0.1)
    used = set()
    for seed in range(8):
        choice, out = twin_draw(augment, wav, seed)
        used.add(choice.noise)
        assert len(out) == len(wav) and snr_db(wav, out) == pytest.approx(choice.snr_db, abs=0.5)
    assert used == set(augment.noise_files)


@pytest.mark.parametrize("seed", range(4))
def test_gain_is_in_db(seed):
    wav = sine(440, amplitude=0.1)
    choice, out = twin_draw(WaveAugment(WaveAugmentConfig(gain_db=6.0)), wav, seed)
    assert -6 <= choice.gain_db <= 6
    assert 20 * np.log10(np.abs(out).max() / np.abs(wav).max()) == pytest.approx(choice.gain_db, abs=1e-3)


def test_output_never_exceeds_full_scale():
    out = WaveAugment(WaveAugmentConfig(gain_db=20.0, noise_snr=(0.0, 0.0)))(sine(440, amplitude=0.9),
                                                                             np.random.default_rng(1))
    assert np.abs(out).max() <= 1.0 and out.dtype == np.float32


FULL = WaveAugmentConfig(speed_factors=(0.9, 1.0, 1.1), pitch_semitones=2.0, noise_snr=(10.0, 30.0), gain_db=6.0,
                         speed_p=0.5, pitch_p=0.5, noise_p=0.5, gain_p=0.5)


def test_same_seed_same_output_other_seeds_differ():
    augment, wav = WaveAugment(FULL), sine(440, seconds=1.0)
    outputs = [augment(wav, np.random.default_rng(seed)) for seed in (3, 3, 4)]
    assert np.array_equal(outputs[0], outputs[1])
    assert not (len(outputs[0]) == len(outputs[2]) and np.array_equal(outputs[0], outputs[2]))


def test_each_operation_follows_its_probability():
    # 400 draws at p = 0.5: 4 standard deviations of the applied share are 0.1
    augment = WaveAugment(FULL)
    rng = np.random.default_rng(0)
    choices = [augment.sample(rng) for _ in range(400)]
    for name in ("speed", "semitones", "snr_db", "gain_db"):
        assert abs(np.mean([getattr(c, name) is not None for c in choices]) - 0.5) < 0.1, name
    assert {c.speed for c in choices} == {None, 0.9, 1.0, 1.1}
    never = WaveAugment(WaveAugmentConfig(gain_db=6.0, gain_p=0.0))
    assert all(never.sample(rng).gain_db is None for _ in range(50))


def test_off_by_default_returns_the_input():
    wav = sine(440, seconds=0.5)
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    augment = augment_from_args(parser.parse_args([]))
    assert not augment.enabled and augment(wav, np.random.default_rng(0)) is wav
    assert WaveAugment()(wav, np.random.default_rng(0)) is wav


def test_cli_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    soundfile.write(tmp_path / "n.wav", np.zeros(1600, dtype=np.float32) + 0.01, SR)
    args = parser.parse_args(["--speed-perturb", "0.9,1.0,1.1", "--pitch-shift", "2", "--noise-snr", "10,30",
                              "--noise-dir", str(tmp_path), "--gain-db", "6", "--aug-p", "0.3", "--noise-p", "1"])
    config = augment_from_args(args).config
    assert config.speed_factors == (0.9, 1.0, 1.1) and config.pitch_semitones == 2.0
    assert config.noise_snr == (10.0, 30.0) and config.gain_db == 6.0
    assert (config.speed_p, config.pitch_p, config.noise_p, config.gain_p) == (0.3, 0.3, 1.0, 0.3)
    for bad in (["--noise-snr", "30,10"], ["--aug-p", "2"], ["--speed-perturb", "fast"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(ValueError, match="needs --noise-snr"):
        augment_from_args(parser.parse_args(["--noise-dir", str(tmp_path)]))
