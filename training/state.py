"""Where a training run stands: the one dataclass the loop advances and a checkpoint saves and loads."""
import json
from dataclasses import dataclass, field

from training.checkpoint import rng_state, set_rng_state


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the data position after the last step: epoch, and samples of it already trained on
    consumed: int = 0
    skipped: int = 0  # non-finite steps skipped, in total: scaler skips + bad steps (see train.skip_step)
    scaler_skips: int = 0  # of those, fp16 overflows while the loss scale was still falling
    history: dict = field(default_factory=dict)  # evaluations: "base", "stepK", and "best" ({step, macro_cer})
    rng: dict = field(default_factory=rng_state)  # RNG states at the last step boundary
    # not saved: they describe this process, not the run
    bad_in_row: int = 0  # non-finite steps in a row (a resume starts after a good step)
    stop: str | None = None  # the signal that asked the run to stop (SIGINT, SIGTERM)
    train_s: float = 0.0  # this process's time in the loop, evaluations during it included

    def to_checkpoint(self, model, optimizer, scaler, sampler, *, full: bool, base_fingerprint: str,
                      rank_hook=None) -> dict:
        """Everything an exact resume needs. LoRA and dialect-ID runs keep only the adapter tensors and the trained
        parameters (`full` False): the frozen base is reloaded from --model on resume, and `base_fingerprint`
        checks it is the same base."""
        trained = {k for k, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model.state_dict().items() if full or "lora_" in k or k in trained}
        ckpt = dict(model=model_state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    step=self.step, epoch=self.epoch, consumed=self.consumed, skipped=self.skipped,
                    scaler_skips=self.scaler_skips, train_s=self.train_s, rng=self.rng,
                    sampler=sampler.state_dict(), history=json.dumps(self.history), base_fingerprint=base_fingerprint)
        if rank_hook is not None:
            ckpt["rank_hook"] = rank_hook.state_dict()
        return ckpt

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TrainState":
        """The counters of a checkpoint; the global RNG is set back to where that step left it."""
        set_rng_state(ckpt["rng"])
        return cls(step=ckpt["step"], epoch=ckpt["epoch"], consumed=ckpt["consumed"], skipped=ckpt["skipped"],
                   scaler_skips=ckpt.get("scaler_skips", 0), train_s=ckpt.get("train_s", 0.0),
                   history=json.loads(ckpt["history"]), rng=ckpt["rng"])
