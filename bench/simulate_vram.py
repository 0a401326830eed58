"""The 6 GB VRAM claim without a GPU: peak live tensor bytes of real training steps on fake tensors.

    python bench/simulate_vram.py                        # tiny full FT, 4 x 4, 30 s, 448 and 300 tokens (+ LoRA rows)
    python bench/simulate_vram.py --dims tiny --modes full --tokens 448 --steps 2

What runs is this repository's step: the model set up by train.prepare_model (random weights at the real
dims), train.accumulate (fp16 autocast forward, fp32 cross-entropy, scaled backward per micro-batch), then the
loop's unscale / clip / GradScaler step / zero_grad, with training.optim.build_optimizer's fused AdamW. Every
tensor is a FakeTensor (torch's FakeTensorMode: shapes, dtypes and lifetimes, no memory), and
training.vram.LiveBytes counts the live storages, rounded to 512 bytes as CUDA's caching allocator does.
Two optimizer steps run: AdamW creates its moments in the first, so the second is the steady state.

Why the fake tensors are CPU tensors under fp16 autocast, and not CUDA ones: on a machine without a GPU,
autograd cannot run backward on fake CUDA tensors (torch 2.11 asks the driver for device 0's context:
"hasPrimaryContext expects a valid device index"), and scaled_dot_product_attention on fake CUDA falls back to
the math kernel, which keeps [B, heads, T, T] attention matrices a GPU's flash / memory-efficient kernel never
makes. The CPU's fused attention keeps what those keep (output and log-sum-exp). `--check-device` runs the
forward on fake CUDA under CUDA autocast next to fake CPU under CPU autocast (math attention on both, so the
kernels match) and prints both: equal bytes mean the two autocasts cast the same tensors (weights included).

`--validate` runs the tracker on a real CPU step of a small model inside torch.profiler(profile_memory=True),
whose allocation events come from c10's CPU allocator itself, and prints both peaks.
"""
import argparse
import os
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from whisper.model import ModelDimensions, Whisper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from data.collate import Batch  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.vram import LiveBytes, ScalarReads, autocast_without_gpu  # noqa: E402

GIB = 2**30
DIMS = {"tiny": (384, 6, 4), "base": (512, 8, 6)}  # n_state, n_head, n_layer (as bench_memory.py)
PREFIX = 3  # <|startoftranscript|><|bo|><|transcribe|>: no loss on predicting them (memory does not depend on it)


def whisper_dims(name: str, n_vocab: int = 51865) -> ModelDimensions:
    n_state, n_head, n_layer = DIMS[name]
    return ModelDimensions(80, 1500, n_state, n_head, n_layer, n_vocab, 448, n_state, n_head, n_layer)


def random_model(dims: ModelDimensions, mode: str = "full", lora_r: int = 32) -> Whisper:
    """A real CPU model at `dims`, set up for training as train.py does (LoRA on q,v or every weight)."""
    torch.manual_seed(0)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    del model.alignment_heads  # a sparse bool mask for word timestamps; fake tensors cannot hold sparse ones
    args = train.build_parser().parse_args(["--mode", mode, "--lora-r", str(lora_r), "--lora-alpha", str(2 * lora_r)])
    model, _, _ = train.prepare_model(model, args, total_steps=100, device="cpu", labels=[])
    return model.train()


def to_fake(model, fake_mode: FakeTensorMode, device: str):
    """The model's parameters and buffers as fake tensors on `device` (Parameters stay Parameters)."""
    with fake_mode:
        return model._apply(lambda t: fake_mode.from_tensor(t).to(device))


def make_batches(n: int, batch: int, n_tokens: int, dims: ModelDimensions, device: str, n_frames: int = 3000):
    """`n` micro-batches of 30 s windows (mel [B, n_mels, 3000]) and `n_tokens` decoder positions each."""
    out = []
    for _ in range(n):
        targets = torch.randint(0, dims.n_vocab, (batch, n_tokens), device=device)
        targets[:, :PREFIX - 1] = -100
        out.append(Batch(mel=torch.randn(batch, dims.n_mels, n_frames, device=device),
                         n_frames=torch.full((batch,), n_frames, device=device),
                         decoder_input=torch.randint(0, dims.n_vocab, (batch, n_tokens), device=device),
                         targets=targets, dialects=["utsang"] * batch, texts=[""] * batch, ids=[""] * batch))
    return out


def optimizer_step(model, optimizer, scaler, batches, autocast, tracker: LiveBytes, device: str) -> None:
    """One optimizer step as train.train takes it: accumulate, unscale, clip, step, update, zero_grad."""
    train.accumulate(model, batches, autocast=autocast, scaler=scaler, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with tracker.labelled("optimizer step"):
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
    tracker.recategorize([t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)],
                         "optimizer state")
    optimizer.zero_grad(set_to_none=True)


def run_steps(model, tracker: LiveBytes, dims: ModelDimensions, batch: int, accum: int, n_tokens: int, steps: int,
              amp: torch.dtype | None, n_frames: int = 3000) -> None:
    """`steps` optimizer steps of `accum` micro-batches under `amp` autocast (with a GradScaler for fp16)."""
    optimizer = build_optimizer(model, 1e-5, 0.01, "cpu")  # fused AdamW, as on CUDA
    scaler = torch.amp.GradScaler("cpu", enabled=amp is torch.float16)  # CUDA's in the real run: a few scalars
    for _ in range(steps):
        # all micro-batches on the device at once: <= 12 MiB more than the loop's one at a time at 4 x 4
        batches = make_batches(accum, batch, n_tokens, dims, "cpu", n_frames)
        autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
        optimizer_step(model, optimizer, scaler, batches, autocast, tracker, "cpu")
        del batches


def tracked(model, granularity: int = 1) -> LiveBytes:
    tracker = LiveBytes(granularity=granularity)
    tracker.track(model.parameters(), "parameters")
    tracker.track(model.buffers(), "parameters")
    tracker.label_gradients(model.parameters())
    return tracker


def simulate(dims: ModelDimensions, mode: str = "full", batch: int = 4, accum: int = 4, n_tokens: int = 448,
             steps: int = 2, lora_r: int = 32, n_frames: int = 3000, granularity: int = 512,
             amp: torch.dtype | None = torch.float16) -> dict:
    """Peak live bytes of `steps` optimizer steps on fake tensors, under `amp` autocast (GradScaler with fp16)."""
    model = random_model(dims, mode, lora_r)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    model = to_fake(model, fake_mode, "cpu")
    tracker = tracked(model, granularity)
    start = tracker.current
    with fake_mode, ScalarReads(), tracker:
        run_steps(model, tracker, dims, batch, accum, n_tokens, steps, amp, n_frames)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak": tracker.peak, "breakdown": tracker.peak_breakdown, "params": n_params,
            "trainable": n_trainable, "start": start, "end": tracker.current}


def forward_bytes(dims: ModelDimensions, device: str, batch: int = 2, n_tokens: int = 64, n_frames: int = 3000,
                  attention: SDPBackend = SDPBackend.MATH) -> dict:
    """End-of-forward live bytes by category for one fp16-autocast forward on fake `device` (math attention:
    the only kernel fake CUDA can choose without a GPU)."""
    model = random_model(dims, "full")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    model = to_fake(model, fake_mode, device)
    tracker = tracked(model)
    with fake_mode, tracker, sdpa_kernel(attention):
        (b,) = make_batches(1, batch, n_tokens, dims, device, n_frames)
        with autocast_without_gpu(device, torch.float16):
            logits = model(b.mel, b.decoder_input)
        result = {"current": tracker.current, "peak": tracker.peak, **tracker.by_category}
        del logits  # alive up to the count above
    return result


def profiled_cpu_step(dims: ModelDimensions, batch: int = 2, accum: int = 2, n_tokens: int = 32,
                      n_frames: int = 3000, steps: int = 2, amp: torch.dtype | None = None) -> dict:
    """Real CPU steps (fp32, or `amp` autocast) tracked by LiveBytes inside torch.profiler: both peaks, above
    the start."""
    model = random_model(dims, "full")
    tracker = tracked(model)
    start = tracker.current
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, acc_events=True) as prof, tracker:
        run_steps(model, tracker, dims, batch, accum, n_tokens, steps, amp, n_frames)
    return {"tracker": tracker.peak - start, "profiler": allocator_peak(prof), "breakdown": tracker.peak_breakdown}


def allocator_peak(prof) -> int:
    """The highest sum of CPU allocations minus frees over the profile, from c10's allocator events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


CATEGORIES = ("parameters", "gradients", "optimizer state", "autocast weight copies", "activations", "backward",
              "optimizer step")


def table(rows, budget: float, context_mb: float) -> str:
    head = ["config", "trainable", "peak GiB", *CATEGORIES, f"+ context {context_mb:.0f} MiB", f"margin to {budget:g} GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        total = r["peak"] + context_mb * 2**20
        cells = [label, f"{r['trainable'] / 1e6:.1f} M", f"{r['peak'] / GIB:.3f}",
                 *(f"{r['breakdown'].get(c, 0) / GIB:.3f}" for c in CATEGORIES), f"{total / GIB:.3f}",
                 f"{budget - total / GIB:.2f} GiB ({100 * (1 - total / (budget * GIB)):.0f}%)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="tiny,base", help="comma-separated: tiny, base")
    p.add_argument("--modes", default="full,lora", help="comma-separated: full, lora (LoRA r=32 on q,v)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--tokens", default="448,300", help="decoder positions per clip: comma-separated")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the second is the steady state)")
    p.add_argument("--budget", type=float, default=6.0, help="GiB of the card")
    p.add_argument("--context-mb", type=float, default=500.0,
                   help="allowance for the CUDA context and kernels' code (not a tensor, so not simulated)")
    p.add_argument("--validate", action="store_true", help="also compare the tracker with torch.profiler on a real CPU step")
    p.add_argument("--check-device", action="store_true", help="also compare fake CUDA and fake CPU autocast forwards")
    args = p.parse_args(argv)
    dims_names, modes = args.dims.split(","), args.modes.split(",")
    for flag, values, known in (("--dims", dims_names, DIMS), ("--modes", modes, ("full", "lora"))):
        if any(v not in known for v in values):
            raise SystemExit(f"error: {flag} {','.join(values)}: each must be one of {', '.join(known)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise SystemExit(f"error: --tokens {args.tokens}: expected comma-separated integers, e.g. 448,300") from None
    if any(not 1 <= t <= 448 for t in tokens) or args.batch_size < 1 or args.grad_accum < 1 or args.steps < 1:
        raise SystemExit("error: --tokens must be in 1..448 (the decoder's context); --batch-size, --grad-accum, "
                         "--steps must be positive")
    print(f"torch {torch.__version__}; {args.batch_size} x {args.grad_accum} clips of 30 s, fp16 autocast + "
          f"GradScaler, fused AdamW, {args.steps} optimizer steps; storages rounded to 512 B")
    rows = []
    for name in dims_names:
        for mode in modes:
            for n in tokens if mode == "full" and name == dims_names[0] else tokens[:1]:
                t0 = time.time()
                r = simulate(whisper_dims(name), mode, args.batch_size, args.grad_accum, n, args.steps)
                label = f"{name} {'full FT' if mode == 'full' else 'LoRA r=32 q,v'}, {n} tokens"
                print(f"{label}: peak {r['peak'] / GIB:.3f} GiB ({time.time() - t0:.0f} s)", flush=True)
                rows.append((label, r))
    print(table(rows, args.budget, args.context_mb))
    if args.check_device:
        for device, attention in (("cuda", SDPBackend.MATH), ("cpu", SDPBackend.MATH), ("cpu", SDPBackend.FLASH_ATTENTION)):
            r = forward_bytes(whisper_dims("tiny"), device, attention=attention)
            print(f"tiny forward, batch 2, 64 tokens, {attention.name} attention, fake {device}: "
                  + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in r.items()))
    if args.validate:
        for amp in (None, torch.bfloat16):
            r = profiled_cpu_step(whisper_dims("tiny"), amp=amp)
            print(f"real CPU steps (tiny dims, {'bf16 autocast' if amp else 'fp32'}, 2 x 2 clips of 30 s, 32 tokens, "
                  f"2 steps), peak above start: tracker {r['tracker'] / 2**20:.1f} MiB, torch.profiler allocator "
                  f"{r['profiler'] / 2**20:.1f} MiB (tracker/profiler {r['tracker'] / r['profiler']:.4f}); autocast "
                  f"weight copies at the peak {r['breakdown'].get('autocast weight copies', 0) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
