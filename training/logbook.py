"""What a run reports while it trains: a progress line on the terminal, scalars and texts in TensorBoard."""
import os
import sys


class ProgressLog:
    """A tqdm bar with ETA on a terminal; plain periodic lines when output goes to a file."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.total = total

    def update(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.tty:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        else:
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.1f} samples/s", flush=True)

    def close(self) -> None:
        self.bar.close()


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: they log nothing."""

    def __getattr__(self, name):
        return lambda *a, **kw: None


def open_writer(run_dir: str, is_main: bool):
    """TensorBoard events under RUN_DIR/tb on rank 0; a writer that logs nothing on the other ranks."""
    if not is_main:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(run_dir, "tb"))


def log_eval(tb, system: str, result: dict, step: int) -> None:
    """eval_SYSTEM/DIALECT/{cer,wer,ser} scalars (macro average included), and per dialect, as text, the
    reference / hypothesis pairs of the same few clips at every evaluation (eval_SYSTEM/examples/DIALECT); for a
    dialect-ID evaluation, eval_SYSTEM/accuracy and eval_SYSTEM/DIALECT/recall."""
    if "accuracy" in result:
        tb.add_scalar(f"eval_{system}/accuracy", result["accuracy"], step)
        for dialect, recall in result["recall"].items():
            tb.add_scalar(f"eval_{system}/{dialect}/recall", recall, step)
        return
    for dialect, m in result.items():
        if not isinstance(m, dict) or dialect == "_micro":
            continue
        for metric in ("cer", "wer", "ser"):
            if m.get(metric) is not None:
                tb.add_scalar(f"eval_{system}/{dialect}/{metric}", m[metric], step)
    for dialect, table in result.get("_examples", {}).items():
        tb.add_text(f"eval_{system}/examples/{dialect}", table, step)
