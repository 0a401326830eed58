"""Peak training memory: train.py --report-memory for the 6 GB targets, next to a plain batch in the same run.

    python bench/bench_memory.py            # CUDA peak allocated on a GPU, process max RSS on CPU

Configurations (random weights at the real dims: memory does not depend on the values):
  tiny full fine-tuning, fp16 AMP, effective batch 16 as 4 x 4 accumulation   vs  16 x 1
  base LoRA r=32 q,v, effective batch 16 as 4 x 4                              vs  16 x 1
Each runs in its own subprocess so the peaks do not mix. Prints MB and ours/plain ratios.
"""
import os
import re
import subprocess
import sys
import tempfile

import torch
from whisper.model import ModelDimensions, Whisper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from whisper_ft.models import export_openai  # noqa: E402

DIMS = {"tiny": (384, 6, 4), "base": (512, 8, 6)}  # n_state, n_head, n_layer


def random_model(name: str, path: str) -> str:
    n_state, n_head, n_layer = DIMS[name]
    dims = ModelDimensions(80, 1500, n_state, n_head, n_layer, 51865, 448, n_state, n_head, n_layer)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    export_openai(model, path)
    return path


def peak(model_path: str, mode: str, batch: int, accum: int, extra=()) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model_path, "--mode", mode, "--data", "demo",
           "--batch-size", str(batch), "--grad-accum", str(accum), "--report-memory", "--no-base-eval",
           "--out", tempfile.mkdtemp(prefix="benchmem-"), *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"peak memory after \d+ steps: (\d+) MB \(([^)]+)\)", out.stdout)
    if not m:
        raise SystemExit(f"train.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(m.group(1)), m.group(2)


def main():
    cuda = torch.cuda.is_available()
    amp = ["--amp", "fp16"] if cuda else []
    tmp = tempfile.mkdtemp(prefix="benchmem-models-")
    rows = []
    for name, mode, extra in (("tiny", "full", amp), ("base", "lora", amp + ["--lora-r", "32"])):
        path = random_model(name, os.path.join(tmp, f"{name}.pt"))
        ours, kind = peak(path, mode, 4, 4, extra)
        plain, _ = peak(path, mode, 16, 1, extra)
        rows.append((f"{name} {mode}", ours, plain, kind))
    print("| config (effective batch 16) | ours 4x4 MB | plain 16x1 MB | ours/plain | measured |")
    print("|---|---|---|---|---|")
    for label, ours, plain, kind in rows:
        print(f"| {label} | {ours:.0f} | {plain:.0f} | {ours / plain:.2f} | {kind} |")
    if cuda:
        print("target: tiny full fp16 and base LoRA under 6144 MB:",
              "met" if all(r[1] < 6144 for r in rows) else "NOT met")


if __name__ == "__main__":
    main()
