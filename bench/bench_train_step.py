"""Training step speed and memory: ours (LoRA, full FT) against HF+PEFT and a naive LoRA loop, same run.

    .venv/bin/python bench/bench_train_step.py            # tiny and base dims (~5-8 min on 2 cores)
    .venv/bin/python bench/bench_train_step.py --quick    # tiny dims only, a smoke test
    .venv/bin/python bench/bench_train_step.py --profile  # torch.profiler top ops of ours LoRA (base dims)

One step = forward + backward + gradient clipping + AdamW step + zero_grad, fp32, batch 4, 40 label tokens,
random weights at the real dims (whisper.model.ModelDimensions of tiny and base; timings do not depend on
the values). Every configuration runs in its own subprocess, so peak memory is per configuration: the
child's max RSS from os.wait4 on CPU, CUDA peak allocated on a GPU. Rows:
  HF+PEFT LoRA   transformers WhisperForConditionalGeneration (same dims, random init) + peft LoRA r=32 on
                 q_proj,v_proj, the standard loop (model(..., labels=...).loss, backward, clip, step);
                 runs in bench/.venv-peers (bench/requirements.txt), since transformers breaks `datasets`
  naive LoRA     openai-whisper + a minimal hand-written LoRA wrapper on query/value, the same plain loop
  ours LoRA      lora.inject.add_lora(preset qv, r=32) and train.py's own `accumulate` (token-mean cross
                 entropy), then train.py's optimizer step (build_optimizer's AdamW, clip_grad_norm_)
  ours full FT   the same with every parameter trained
  ... 2-8 s      ours with the dynamic encoder context (whisper_ft/encoder.py) on 2-8 s clips, the batch cut
                 as train.py --audio-ctx auto cuts it; peers cannot shorten the window, so their 30 s rows
                 are what such clips cost them (the zero padding costs the same as speech)
  ... bf16       ours LoRA under CPU bf16 autocast, where the CPU has avx512_bf16; its losses are printed
                 next to fp32's at the same inputs and steps; HF+PEFT (kept heap) under the same autocast
  ... kept heap  HF+PEFT with the allocator setting ours runs with on a CPU (training/memory.py:
                 freed memory stays in the heap, so activations do not arrive as fresh pages every step),
                 to show how much of ours' lead that setting is
Model FLOPs of one step are counted with torch.utils.flop_counter.FlopCounterMode on the warm-up step
(matmuls, convolutions, attention; the CPU flash-attention kernels added below), and shown as a fraction of
the fp32 GEMM peak measured in this run (the best of a 2048^3 torch.matmul sampled before, between and after
the configurations: a shared machine's speed drifts by 20% over a day). Other work shares the CPU: configurations
are interleaved and the load average is printed; the ratios are what matter.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, "bench", ".venv-peers", "bin", "python")
DIMS = {"tiny": (384, 6, 4), "base": (512, 8, 6)}  # n_state, n_head, n_layer (audio and text alike)
BATCH, TOKENS, FRAMES = 4, 40, 3000
SHORT_S = (2.0, 8.0)  # clip lengths of the dynamic-context rows: evenly spread, so the longest is 8 s
LORA = dict(r=32, alpha=64.0, dropout=0.05)  # the same for every LoRA row
LR = {"lora": 1e-3, "full": 1e-5}
WEIGHT_DECAY, CLIP = 0.01, 1.0


# -- inputs and models (worker side) -------------------------------------------------------------------
def make_inputs(short: bool):
    """mel [B, 80, 3000], n_frames [B], decoder input and targets [B, 40]: the same tensors for every system."""
    import torch

    g = torch.Generator().manual_seed(1234)
    if short:
        lo, hi = SHORT_S
        n_frames = torch.tensor([round(100 * (lo + (hi - lo) * i / (BATCH - 1))) for i in range(BATCH)])
    else:
        n_frames = torch.full((BATCH,), FRAMES)
    mel = torch.randn(BATCH, 80, FRAMES, generator=g) * 0.5
    silence = -0.75  # roughly whisper's log-mel of zero padding; any constant costs the same
    for b, n in enumerate(n_frames.tolist()):
        mel[b, :, n:] = silence
    tokens = torch.randint(0, 50257, (BATCH, TOKENS + 1), generator=g)  # text tokens of the multilingual vocab
    return mel, n_frames, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def openai_whisper(dims_name: str):
    import torch
    from whisper.model import ModelDimensions, Whisper

    n_state, n_head, n_layer = DIMS[dims_name]
    dims = ModelDimensions(80, 1500, n_state, n_head, n_layer, 51865, 448, n_state, n_head, n_layer)
    torch.manual_seed(0)
    model = Whisper(dims)
    # whisper leaves the text positions uninitialised (torch.empty) and draws token embeddings from N(0, 1),
    # which makes random-init logits huge; std 0.02 as transformers' init gives a loss near ln(n_vocab)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    torch.nn.init.normal_(model.decoder.token_embedding.weight, std=0.02)
    return model


def setup_ours(cfg, device):
    """(step function, trainable parameter count) for ours: train.py's accumulate and optimizer step."""
    import torch

    sys.path.insert(0, ROOT)
    from data.collate import Batch, Collator
    from lora.inject import add_lora, count_parameters, mark_only_lora_trainable
    from train import accumulate
    from whisper_ft.encoder import enable_dynamic_audio_ctx
    from training.optim import build_optimizer

    model = openai_whisper(cfg["dims"]).to(device)
    if cfg["mode"] == "lora":
        add_lora(model, "default", targets="qv", **LORA)
        mark_only_lora_trainable(model)
    else:
        model.requires_grad_(True)
    mel, n_frames, dec, tgt = make_inputs(cfg["short"])
    enable_dynamic_audio_ctx(model)  # as train.py does, at every --audio-ctx
    if cfg["short"]:
        mel = mel[:, :, : Collator(None, audio_ctx="auto").frames_for(n_frames.tolist())]
    batch = Batch(mel=mel, n_frames=n_frames, decoder_input=dec, targets=tgt, dialects=["x"] * BATCH,
                  texts=[""] * BATCH, ids=[str(i) for i in range(BATCH)])
    optimizer = build_optimizer(model, LR[cfg["mode"]], WEIGHT_DECAY, device)
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if cfg["amp"] == "bf16"
                else torch.autocast(device_type=device.split(":")[0], enabled=False))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step():  # train.py's loop body for one optimizer step of one micro-batch
        loss, _ = accumulate(model, [batch], autocast=autocast, scaler=scaler, device=device)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, count_parameters(model)[0], model


class NaiveLoRA:
    """What a tutorial writes: base(x) + dropout(x) @ A^T @ B^T * alpha/r, the base layer frozen."""

    @staticmethod
    def wrap(linear, r, alpha, dropout):
        import torch
        from torch import nn

        class LoRA(nn.Module):
            def __init__(self):
                super().__init__()
                self.base = linear
                self.A = nn.Parameter(torch.randn(r, linear.in_features) / r)
                self.B = nn.Parameter(torch.zeros(linear.out_features, r))
                self.drop = nn.Dropout(dropout)
                self.scale = alpha / r

            def forward(self, x):
                return self.base(x) + self.drop(x) @ self.A.T @ self.B.T * self.scale

        return LoRA()


def setup_naive(cfg, device):
    import torch.nn.functional as F

    model = openai_whisper(cfg["dims"])
    model.requires_grad_(False)
    for block in list(model.encoder.blocks) + list(model.decoder.blocks):
        for attn in [block.attn] + ([block.cross_attn] if block.cross_attn is not None else []):
            attn.query = NaiveLoRA.wrap(attn.query, LORA["r"], LORA["alpha"], LORA["dropout"])
            attn.value = NaiveLoRA.wrap(attn.value, LORA["r"], LORA["alpha"], LORA["dropout"])
    model.to(device).train()
    mel, _, dec, tgt = (t.to(device) for t in make_inputs(False))

    def loss_fn():
        logits = model(mel, dec)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    return (*plain_loop_step(model, loss_fn), model)


def plain_loop_step(model, loss_fn):
    """The peers' step as a tutorial writes it: plain AdamW over the trainable parameters, clip, step.

    Returns (step, trainable parameter count); step() runs loss_fn, backward and the update, returns the loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR["lora"], weight_decay=WEIGHT_DECAY)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


def setup_hf(cfg, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    n_state, n_head, n_layer = DIMS[cfg["dims"]]
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=n_state, encoder_layers=n_layer,
                           decoder_layers=n_layer, encoder_attention_heads=n_head, decoder_attention_heads=n_head,
                           encoder_ffn_dim=4 * n_state, decoder_ffn_dim=4 * n_state, max_source_positions=1500,
                           max_target_positions=448)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=["q_proj", "v_proj"]))
    model.to(device).train()
    mel, _, dec, tgt = (t.to(device) for t in make_inputs(False))

    def loss_fn():  # bf16: the same CPU autocast as ours' bf16 row, as a tutorial adds it
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg["amp"] == "bf16"):
            return model(input_features=mel, decoder_input_ids=dec, labels=tgt).loss
    return (*plain_loop_step(model, loss_fn), model)


def flop_counter():
    """FlopCounterMode that also counts torch's CPU flash-attention kernels (it knows only the CUDA ones)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kw):
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kw):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})


def worker(cfg) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and (cfg["system"] == "ours" or cfg.get("kept_heap")):  # train.py does it on CPU
        sys.path.insert(0, ROOT)
        from training.memory import keep_freed_memory
        keep_freed_memory()
    setup = {"ours": setup_ours, "naive": setup_naive, "hf": setup_hf}[cfg["system"]]
    step, trainable, model = setup(cfg, device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    losses, times = [], []
    counter = flop_counter()
    with counter:  # the warm-up step: first-call allocations, kernel selection, and the FLOP count
        losses.append(step())
    flops = counter.get_total_flops()
    for _ in range(cfg["warmup"] - 1):
        losses.append(step())
    if cfg.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(2):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
        return {}
    for _ in range(cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    out = dict(times=times, losses=[float(x) for x in losses], trainable=trainable, flops=flops)
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- the driver ------------------------------------------------------------------------------------------
def gemm_peak(threads: int, n: int = 2048, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of an n x n matmul with `threads` threads (in this process), into a preallocated output
    (a fresh 16 MB output per call pays page faults that no step of a kept heap pays)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    cuda = torch.cuda.is_available()
    if cuda:
        a, b = a.cuda(), b.cuda()
    c = torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_child(cfg) -> dict:
    """Run one configuration in a subprocess; its result plus its own max RSS (os.wait4) in MB."""
    python = PEERS_PYTHON if cfg["system"] == "hf" else sys.executable
    with tempfile.TemporaryDirectory(prefix="benchstep-") as tmp:
        result, log = os.path.join(tmp, "result.json"), os.path.join(tmp, "log.txt")
        with open(log, "w") as f:
            proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", json.dumps(cfg), "--result", result],
                                    cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        with open(log) as f:
            text = f.read()
        if proc.returncode != 0 or not os.path.isfile(result):
            raise SystemExit(f"{label(cfg)} failed (exit {proc.returncode}):\n{text[-3000:]}")
        with open(result) as f:
            out = json.load(f)
    out["rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    out["log"] = text
    return out


def label(cfg) -> str:
    name = {"hf": "HF+PEFT LoRA", "naive": "naive LoRA", "ours": f"ours {'LoRA' if cfg['mode'] == 'lora' else 'full FT'}"}
    s = name[cfg["system"]]
    if cfg["short"]:
        s += f", dyn ctx {SHORT_S[0]:g}-{SHORT_S[1]:g} s"
    if cfg["amp"] == "bf16":
        s += ", bf16 autocast"
    if cfg.get("kept_heap"):
        s += ", kept heap"
    return s


def configs(dims_name, common, bf16):
    """The order configurations run in: peers and ours alternate, so a load change hits both."""
    c = dict(common, dims=dims_name, short=False, amp="fp32", mode="lora")
    out = [dict(c, system="hf"), dict(c, system="ours"), dict(c, system="hf", kept_heap=True), dict(c, system="naive"),
           dict(c, system="ours", mode="full"),
           dict(c, system="ours", short=True), dict(c, system="ours", mode="full", short=True)]
    if bf16:
        out += [dict(c, system="ours", amp="bf16"), dict(c, system="hf", amp="bf16", kept_heap=True)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny dims only: a smoke test")
    ap.add_argument("--dims", default="tiny,base", help="comma-separated: tiny, base")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (the median counts)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one counts FLOPs)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every configuration, in reversed order each time")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", default=None, help="comma-separated systems to run: hf, naive, ours")
    ap.add_argument("--profile", action="store_true", help="profile ours LoRA at base dims (or --dims) and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(json.loads(args.worker))
        with open(args.result, "w") as f:
            json.dump(out, f)
        return
    common = dict(steps=args.steps, warmup=max(1, args.warmup), threads=args.threads)
    if args.profile:
        dims = "base" if args.dims == "tiny,base" else args.dims
        print(run_child(dict(common, system="ours", mode="lora", dims=dims, short=False, amp="fp32",
                             profile=True))["log"])
        return
    if not os.path.isfile(PEERS_PYTHON):
        raise SystemExit(f"no {PEERS_PYTHON}: python3 -m venv bench/.venv-peers && "
                         f"bench/.venv-peers/bin/pip install -r bench/requirements.txt")
    import torch

    dims_list = ["tiny"] if args.quick else args.dims.split(",")
    sys.path.insert(0, ROOT)
    from training.setup import cpu_has_bf16

    bf16 = cpu_has_bf16() and not torch.cuda.is_available()
    plan = [c for d in dims_list for c in configs(d, common, bf16)]
    if args.only:
        plan = [c for c in plan if c["system"] in args.only.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {device}; torch {torch.__version__}; threads {args.threads}; "
          f"batch {BATCH}, {TOKENS} label tokens; warm-up {common['warmup']}, {args.steps} timed steps x "
          f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f}", flush=True)
    peaks = [gemm_peak(args.threads)]
    results, loads = {}, []
    for rnd in range(args.rounds):
        for cfg in (plan if rnd % 2 == 0 else plan[::-1]):
            key = (cfg["dims"], label(cfg))
            t0 = time.time()
            out = run_child(cfg)
            loads.append(os.getloadavg()[0])
            r = results.setdefault(key, dict(times=[], rss=[], losses=out["losses"], trainable=out["trainable"],
                                             flops=out["flops"], cfg=cfg))
            r["times"] += out["times"]
            r["rss"].append(out.get("cuda_peak_mb", out["rss_mb"]))
            print(f"  {cfg['dims']} {key[1]}: median step {statistics.median(out['times']):.2f} s, "
                  f"peak {r['rss'][-1]:.0f} MB ({time.time() - t0:.0f} s, load {loads[-1]:.2f})", flush=True)
            peaks.append(gemm_peak(args.threads))  # between configurations: the machine's speed drifts too
    peak = max(peaks)
    print(f"\nfp32 GEMM peak (2048^3 matmul, best of {len(peaks)} samples across the run): {peak / 1e9:.1f} GFLOP/s "
          f"(lowest sample {min(peaks) / 1e9:.1f}); load average during the run {min(loads):.2f}-{max(loads):.2f} (1 min)")
    print(report(results, peak, "CUDA peak allocated" if torch.cuda.is_available() else "max RSS"))


def report(results, peak, mem_kind) -> str:
    lines = [f"| dims | config | samples/s | x HF+PEFT | x HF+PEFT same heap and precision | step s | trainable | "
             f"peak MB ({mem_kind}) | mem x HF+PEFT | GFLOP/step | GFLOP/s | % GEMM peak | loss step 1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bf16_notes = []
    for (dims, name), r in results.items():
        t = statistics.median(r["times"])
        sps, mem = BATCH / t, max(r["rss"])
        hf = results.get((dims, "HF+PEFT LoRA"))
        x_sps = f"{sps / (BATCH / statistics.median(hf['times'])):.2f}x" if hf else "n/a"
        x_mem = f"{mem / max(hf['rss']):.2f}x" if hf else "n/a"
        # the peer given what ours runs with: the kept heap (train.py on a CPU) and the same autocast
        same = results.get((dims, "HF+PEFT LoRA" + (", bf16 autocast" if r["cfg"]["amp"] == "bf16" else "")
                            + ", kept heap"))
        x_same = f"{statistics.median(same['times']) / t:.2f}x" if same and r["cfg"]["system"] == "ours" else ""
        lines.append(f"| {dims} | {name} | {sps:.3f} | {x_sps} | {x_same} | {t:.2f} | {r['trainable']:,} | {mem:.0f} | {x_mem} | "
                     f"{r['flops'] / 1e9:.0f} | {r['flops'] / t / 1e9:.1f} | {100 * r['flops'] / t / peak:.0f}% | "
                     f"{r['losses'][0]:.4f} |")
        fp32 = results.get((dims, "ours LoRA"))
        if r["cfg"]["amp"] == "bf16" and r["cfg"]["system"] == "ours" and fp32:
            pairs = list(zip(fp32["losses"], r["losses"]))
            diffs = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in pairs)
            worst = max(abs(a - b) / abs(a) for a, b in pairs)
            bf16_notes.append(f"{dims} ours LoRA loss per step fp32/bf16: {diffs} (max relative difference "
                              f"{100 * worst:.2f}%)")
    return "\n".join(lines + [""] + bf16_notes)


if __name__ == "__main__":
    main()
