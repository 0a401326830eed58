"""The VRAM simulation: the live-bytes tracker against torch's own allocator accounting, and the fake-tensor
training step it measures (bench/simulate_vram.py, training/vram.py)."""
import pytest
import torch

from bench.simulate_vram import forward_bytes, main, profiled_cpu_step, random_model, simulate
from conftest import tiny_dims


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_tracker_and_fake_step_peaks_agree_with_the_cpu_allocator_on_a_real_step(amp):
    """Two real optimizer steps (fp32, and bf16 autocast with its weight copies; 2 x 2 clips of 30 s) on a small
    model: the tracker's peak of live storages against the peak of c10's CPU allocator events recorded by
    torch.profiler over the same steps; then the same steps on fake tensors, which allocate nothing.

    The allocator also sees what kernels allocate for themselves and free before returning (scratch buffers),
    which no operator returns and the tracker cannot count, so it may only be higher: 2% allows for that; on
    this machine the peaks were equal to the byte."""
    real = profiled_cpu_step(tiny_dims(), batch=2, accum=2, n_tokens=32, steps=2, amp=amp)
    assert real["profiler"] > 50 * 2**20  # activations of 30 s windows: not a trivially small step
    assert 0.98 * real["profiler"] <= real["tracker"] <= real["profiler"]
    assert (real["breakdown"].get("autocast weight copies", 0) > 0) == (amp is not None)
    fake = simulate(tiny_dims(), batch=2, accum=2, n_tokens=32, steps=2, amp=amp, granularity=1)
    assert 0.98 * real["profiler"] <= fake["peak"] - fake["start"] <= real["profiler"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_fake_step_peak_holds_weights_gradients_adam_state_and_grows_with_the_batch():
    dims = tiny_dims()
    small = simulate(dims, "full", batch=2, accum=2, n_tokens=32, granularity=1)
    large = simulate(dims, "full", batch=4, accum=2, n_tokens=32, granularity=1)
    n = small["params"]
    assert small["trainable"] == n
    # fp32 weights, gradients and AdamW's two moments: 4 bytes x params x (1 + 1 + 2) at least
    assert small["peak"] >= 16 * n
    params = _bytes(random_model(dims).parameters())
    b = small["breakdown"]
    assert b["parameters"] >= params and b["optimizer state"] >= 2 * params and b["gradients"] > 0
    assert b["activations"] > 0
    # two more 30 s clips per micro-batch: more activations, the same weights and state
    assert large["peak"] > small["peak"] + 0.5 * b["activations"]
    assert large["breakdown"]["optimizer state"] == b["optimizer state"]


def test_autocast_fp16_weight_copies_are_live_during_forward_on_fake_cuda():
    """Under CUDA fp16 autocast every Linear and conv weight is cast to fp16 once per forward, and the output
    projection casts the token embedding; autograd keeps these copies for backward after autocast's cache is
    cleared (bias copies are cast too, but no backward needs them: they are gone by then)."""
    dims = tiny_dims()
    r = forward_bytes(dims, "cuda", batch=2, n_tokens=16)
    model = random_model(dims)
    cast = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    cast.append(model.decoder.token_embedding.weight)
    assert r["autocast weight copies"] == sum(t.numel() for t in cast) * 2


def test_fake_cuda_and_fake_cpu_autocast_forwards_keep_the_same_bytes():
    """Why the step is simulated on fake CPU tensors: with the same attention kernel, CUDA and CPU fp16
    autocast leave the same tensors alive after forward (weights, copies, saved activations)."""
    cuda, cpu = (forward_bytes(tiny_dims(), device, batch=2, n_tokens=16) for device in ("cuda", "cpu"))
    assert cuda == cpu and cuda["activations"] > 0


@pytest.mark.parametrize("argv, message", [(["--dims", "huge"], "--dims"), (["--tokens", "500"], "--tokens"),
                                           (["--tokens", "a"], "--tokens")])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value)
