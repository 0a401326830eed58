import argparse

import pytest
import torch

from training.specaugment import (POLICIES, SpecAugment, SpecAugmentConfig, add_specaugment_args, from_policy,
                                    make_generator, specaugment_from_args)

FLOOR = -0.75  # where Whisper's log-mel sits in padding after a clip: (max - 8 + 4) / 4 for max = 1
MARK = 10.0  # a mask value outside Whisper's [-1.5, 1.5] range, so masked cells can be counted exactly


def padded_batch(lengths, n_mels=80, n_time=400, seed=0):
    """A batch like the collate makes: random real frames, the padding after them at the floor."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.rand(len(lengths), n_mels, n_time, generator=g) * 2 - 1
    n = torch.tensor(lengths)
    mel[torch.arange(n_time)[None, None, :].expand_as(mel) >= n[:, None, None]] = FLOOR
    return mel, n


def runs(row):
    """Lengths of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = torch.diff(padded)
    return (torch.nonzero(edges == -1).flatten() - torch.nonzero(edges == 1).flatten()).tolist()


def test_single_masks_respect_their_width_limits():
    # one mask of each kind, so every run of masked bins/frames is one mask; p = 0.2 makes the
    # p * len cap bind for the short utterances and T bind for the long one
    sa = SpecAugment(SpecAugmentConfig(freq_masks=1, freq_width=27, time_masks=1, time_width=40, time_ratio=0.2))
    lengths = [400, 120, 30, 7]
    widest_f, widest_t = 0, [0] * 4
    for step in range(150):
        freq, time = sa.sample_masks(torch.tensor(lengths), 80, 400, make_generator(1, step))
        for b, length in enumerate(lengths):
            widths = runs(freq[b])
            assert len(widths) <= 1 and all(w <= 27 for w in widths)
            widest_f = max([widest_f] + widths)
            t_widths = runs(time[b])
            assert len(t_widths) <= 1 and all(w <= min(40, int(0.2 * length)) for w in t_widths)
            assert not time[b, length:].any()
            widest_t[b] = max([widest_t[b]] + t_widths)
    # and the bounds are reached: widths are drawn from the whole of U{0..limit}
    assert widest_f == 27 and widest_t == [40, 24, 6, 1]


@pytest.mark.parametrize("policy", ["LB", "LD", "adaptive"])
def test_padding_is_never_touched(policy):
    mel, n = padded_batch([400, 250, 90, 3, 0])
    mel[1:, :, 395:] = torch.nan  # padding of utterances 1..4: nan there must not leak into the real frames
    for step in range(5):
        out = from_policy(policy)(mel, n, make_generator(0, step))
        for b, length in enumerate(n.tolist()):
            assert torch.equal(out[b, :, length:].view(torch.int32), mel[b, :, length:].view(torch.int32))
            assert torch.isfinite(out[b, :, :length]).all()
        assert not torch.equal(out[0], mel[0])


@pytest.mark.parametrize("policy", ["LD", "adaptive"])
def test_masked_fraction_matches_expectation(policy):
    # Per utterance, the masked fraction over N independent draws has standard error s / sqrt(N);
    # |mean - expectation| < 4 SE fails by chance with probability ~6e-5 per utterance. The warp stays
    # on: it moves frames before masking, so the expectation must hold with it too.
    sa = from_policy(policy, mask_value=MARK)
    mel, n = padded_batch([400, 220, 90, 30], n_time=400)
    draws = torch.stack([
        (sa(mel, n, make_generator(2, step)) == MARK).float().sum(dim=(1, 2)) / (n * 80)
        for step in range(300)])
    expected = sa.expected_masked_fraction(n, 80).float()
    empirical, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert ((empirical - expected).abs() < 4 * se + 1e-3).all(), (empirical, expected, se)


def test_expected_fraction_closed_forms():
    # one mask of width U{0..F}: expected F/2 bins of M wherever it starts
    sa = SpecAugment(SpecAugmentConfig(freq_masks=1, freq_width=27))
    assert sa.expected_masked_fraction(torch.tensor([100, 5]), 80).tolist() == pytest.approx([27 / 2 / 80] * 2)
    sa = SpecAugment(SpecAugmentConfig(time_masks=1, time_width=100))
    assert sa.expected_masked_fraction(torch.tensor([1000]), 80).item() == pytest.approx(50 / 1000)
    assert SpecAugment(SpecAugmentConfig()).expected_masked_fraction(torch.tensor([10]), 80).item() == 0.0


def test_same_step_same_masks_other_steps_differ():
    mel, n = padded_batch([400, 300])
    sa = from_policy("LD")
    first = sa(mel, n, make_generator(7, 100))
    assert torch.equal(first, sa(mel, n, make_generator(7, 100)))  # e.g. after a resume at step 100
    assert not torch.equal(first, sa(mel, n, make_generator(7, 101)))
    assert not torch.equal(first, sa(mel, n, make_generator(8, 100)))
    # the two utterances of a batch get their own masks
    freq, time = sa.sample_masks(torch.tensor([400, 400]), 80, 400, make_generator(7, 100))
    assert not (torch.equal(freq[0], freq[1]) and torch.equal(time[0], time[1]))


def test_policy_none_is_free():
    mel, n = padded_batch([400])
    assert from_policy("none")(mel, n, make_generator(0, 0)) is mel
    assert SpecAugment(SpecAugmentConfig(freq_masks=2, freq_width=0))(mel, n) is mel


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_keeps_device_and_dtype(device, dtype):
    mel, n = padded_batch([400, 200])
    out = from_policy("LD")(mel.to(device, dtype), n.to(device), make_generator(0, 3))
    assert out.device.type == device and out.dtype == dtype and out.shape == mel.shape
    # masks are drawn on the generator's device, so they do not depend on where the batch is
    reference = from_policy("LD", time_warp=0, mask_value=MARK)(mel, n, make_generator(0, 3))
    moved = from_policy("LD", time_warp=0, mask_value=MARK)(mel.to(device, dtype), n.to(device), make_generator(0, 3))
    assert torch.equal(moved.cpu() == MARK, reference == MARK)


def test_mean_mask_value_uses_real_frames_only():
    mel, n = padded_batch([300, 120])
    mel[:, :, 300:] = 5.0  # padding far from the real mean must not pull the fill value
    sa = from_policy("LD", time_warp=0)
    freq, time = sa.sample_masks(n, 80, 400, make_generator(0, 9))
    out = sa(mel, n, make_generator(0, 9))
    for b, length in enumerate(n.tolist()):
        masked = (freq[b][:, None] | time[b][None, :])[:, :length]
        assert masked.any()
        assert torch.allclose(out[b, :, :length][masked], mel[b, :, :length].mean().expand(int(masked.sum())))


def test_time_warp_keeps_shape_ends_order_and_padding():
    n_time, lengths = 400, [400, 260, 40, 2]
    ramp = torch.arange(n_time, dtype=torch.float32)[None, None, :].repeat(4, 80, 1)
    n = torch.tensor(lengths)
    sa = SpecAugment(SpecAugmentConfig(time_warp=80))
    moved = 0
    for step in range(20):
        out = sa(ramp, n, make_generator(3, step))
        assert out.shape == ramp.shape
        for b, length in enumerate(lengths):
            real = out[b, 0, :length]
            assert torch.equal(out[b, :, length:], ramp[b, :, length:])
            assert real[0] == 0 and real[-1] == length - 1  # both ends fixed
            assert (torch.diff(real) >= 0).all()  # a warp reorders nothing
            moved += int(not torch.equal(real, ramp[b, 0, :length]))
    assert moved > 40  # and it does warp (w = 0 is one draw in 2W + 1)


def test_cli_flags_build_the_policy_with_overrides():
    parser = argparse.ArgumentParser()
    add_specaugment_args(parser)
    sa = specaugment_from_args(parser.parse_args(["--specaugment", "ld", "--time-masks", "3", "--time-warp", "0"]))
    assert sa.config == SpecAugmentConfig(**{**POLICIES["LD"].__dict__, "time_masks": 3, "time_warp": 0})
    assert not specaugment_from_args(parser.parse_args([])).enabled
    assert specaugment_from_args(parser.parse_args(["--specaugment-value", "-0.5"])).config.mask_value == -0.5


def test_bad_values_give_one_line_errors(capsys):
    parser = argparse.ArgumentParser()
    add_specaugment_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--specaugment", "LX"])
    assert "valid: none, LB, LD, adaptive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid: none, LB, LD, adaptive"):
        from_policy("strong")
    with pytest.raises(ValueError, match="time_ratio"):
        from_policy("LD", time_ratio=1.5)


@pytest.mark.parametrize("from_file", [False, True])
def test_png_command_writes_an_image(tmp_path, from_file):
    import numpy as np
    import soundfile
    from training.specaugment import main
    args = ["--policy", "LD", "--out", str(tmp_path / "mel.png"), "--pad-seconds", "1"]
    if from_file:  # a 22.05 kHz stereo file exercises reading, down-mixing and resampling
        t = np.arange(22050) / 22050
        soundfile.write(tmp_path / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.3, 22050)
        args += ["--wav", str(tmp_path / "tone.wav")]
    main(args)
    assert (tmp_path / "mel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_can_join_an_existing_argument_group():
    import warnings
    from training.augment import add_augment_args
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("augmentation (training only)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # argparse warns when groups are nested
        add_specaugment_args(group)
        add_augment_args(group)
    args = parser.parse_args(["--specaugment", "LB", "--gain-db", "3"])
    assert specaugment_from_args(args).config == POLICIES["LB"] and args.gain_db == 3.0
