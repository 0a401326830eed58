"""Fine-tune Whisper on dialects, languages or domains: full fine-tuning or LoRA, one loop, top to bottom.

    python train.py                                  # the offline demo: LoRA on Whisper base, synthetic Tibetan
    python train.py --mode lora --dialect amdo       # one adapter for one dialect
    python train.py --mode full --dialect balanced --model tiny --data openpecha
    python train.py --resume runs/2026-12-02_1700    # continue exactly where a run stopped
    python train.py --task dialect-id --dialect balanced    # a dialect classifier on the frozen encoder

Every flag has a default; `--config FILE.json` supplies values for any of them, flags on the command line
win. The resolved configuration is written to RUN_DIR/config.json, and everything the run writes
(checkpoints, the adapter or model, TensorBoard events, the results table) lives under RUN_DIR.
"""
import argparse
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from data.collate import Collator, SpeechDataset, make_loader
from data.samplers import DialectSampler
from data.sources import DIALECTS, SourceError, add_data_args, data_options, limit_per_dialect, load_examples
from data.validate import DataError
from lora.adapters import save_adapter, set_active_adapter
from lora.inject import count_parameters, describe_trainable, mark_only_lora_trainable
from lora.int8 import storage_bytes
from lora.rank import STRATEGIES, apply_rank_strategy
from scoring.evaluation import evaluate_systems, identify
from scoring.metrics import classification_summary
from scoring.tables import format_dialect_id, format_table, write_results
from training import checkpoint as ckpt
from training.augment import add_augment_args, augment_from_args
from training.dist import all_sum, init_distributed, wrap_ddp
from training.logbook import ProgressLog, log_eval, open_writer
from training.memory import enable_grad_checkpointing, peak_memory_mb
from training.optim import build_optimizer, lr_at
from training.rundir import open_run_dir, resume_config
from training.setup import add_tokens, autocast_for, choose_device, language_of, load_base, select_dialects
from training.specaugment import add_specaugment_args, make_generator, specaugment_from_args
from training.state import TrainState
from whisper_ft.dialect_id import DialectClassifier, DialectHead, save_dialect_id
from whisper_ft.encoder import AUDIO_CTX_HELP, audio_ctx_value, enable_dynamic_audio_ctx
from whisper_ft.models import ModelSpecError, export_openai
from whisper_ft.text import N_TEXT_CTX, extend_tokenizer, normalize_text, tokenizer_for
from whisper_ft.vocab import (added_tokens_metadata, choose_tokens, decoder_length, format_token_report, parse_add_tokens,
                              token_report)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of train.py, with its default; tune.py and the tests read it too."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config",
                   help="JSON file of flag values (flags given here override it; an \"about\" key is a note)")
    p.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="offline:base", help="base model spec (see whisper_ft/models.py)")
    g.add_argument("--data", default="demo", help="data source: demo, openpecha, hf:NAME, or a manifest path")
    g.add_argument("--eval-data", default=None, help="test source (default: --data's test split)")
    g.add_argument("--language", default="bo", help="language token to train and decode with")
    g.add_argument("--language-fallback", default=None,
                   help="Whisper language token to reuse for a language Whisper lacks (e.g. bo for Dzongkha)")
    g.add_argument("--dialect", default="balanced",
                   help="amdo|kham|utsang|a,b (balanced over those)|balanced (all, equal)|all (natural mix)")
    g.add_argument("--sampling", default=None, choices=["balanced", "proportional", "temperature", "natural"],
                   help="override how dialects are mixed (default follows --dialect)")
    g.add_argument("--temperature", type=float, default=1.0, help="for --sampling temperature: p ~ n^(1/T)")
    g.add_argument("--samples", type=int, default=None, help="training samples per epoch (default: all rows)")
    g.add_argument("--fixed-subset", action="store_true",
                   help="with --samples below the rows there are: the same samples every epoch (a training set of "
                        "that size), instead of a fresh draw each epoch")
    g.add_argument("--strict", action="store_true", help="any bad data row is an error before training")
    add_data_args(g)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--add-tokens", default=None, metavar="auto:N|FILE",
                   help="add tokens to the vocabulary: the N most frequent syllables of the training text, or a file "
                        "of tokens one per line (shorter Tibetan targets; saved with the adapter or model)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--task", default="asr", choices=["asr", "dialect-id"],
                   help="asr: transcribe (LoRA or full); dialect-id: a classifier head on the frozen encoder")
    g.add_argument("--mode", default="lora", choices=["lora", "full"])
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="clips per micro-batch")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 lora, 1e-5 full)")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--freeze-encoder", action="store_true")
    g.add_argument("--base-8bit", action="store_true",
                   help="LoRA only: hold the frozen base's Linear weights in int8, one scale per output channel "
                        "(bitsandbytes' kernel on CUDA when installed); adapters stay fp32 and load on the fp32 base")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: bf16 on CUDA where supported, else fp16; fp32 on CPU (fp16 runs on a CPU too, slowly: "
                        "for dry runs of a GPU recipe)")
    g.add_argument("--audio-ctx", default="full",
                   help=AUDIO_CTX_HELP)
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many bad steps in a row: non-finite losses, or fp16 overflows at the "
                        "loss-scale floor (overflows while the scale still falls are scaler skips, not bad steps)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="qv", help="qv | attn | all-linear | comma-separated regexes")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--rank-strategy", default="fixed", choices=STRATEGIES)
    g.add_argument("--rank-spec", default=None, help="mixed: e.g. encoder=8,decoder=32")
    g.add_argument("--warmup-r", type=int, default=None, help="warmup: the high rank trained first")
    g.add_argument("--switch-step", type=int, default=None, help="warmup: step at which to truncate to r")
    g = p.add_argument_group("dialect identification (--task dialect-id)")
    g.add_argument("--head-layers", type=int, default=None,
                   help="encoder blocks the head reads (the first K; fewer run faster when routing); default all")
    g.add_argument("--head-hidden", type=int, default=256, help="the head's conv1d channels and MLP width")
    g = p.add_argument_group("augmentation (training only)")
    add_specaugment_args(g)
    add_augment_args(g)
    _add_eval_args(p.add_argument_group("evaluation, logging, checkpoints"))
    return p


def _add_eval_args(g) -> None:
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every K steps (0: only at start and end); keeps the best "
                   "(lowest macro CER) as adapter_best.safetensors or model_best.pt")
    g.add_argument("--eval-samples", type=int, default=None, help="test clips per dialect (default: all)")
    g.add_argument("--eval-batch-size", type=int, default=16)
    g.add_argument("--beam-size", type=int, default=1)
    g.add_argument("--no-base-eval", action="store_true", help="skip scoring the untrained base at step 0")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--report-memory", action="store_true", help="run a few steps, print peak memory, exit")



def parse_args(argv=None) -> argparse.Namespace:
    """Flags, over the values of --config FILE.json; with --resume, the run's saved config instead."""
    p = build_parser()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    known, _ = first.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {known.config}: {e}")
        values.pop("about", None)  # a config file may say what it is for
        unknown = set(values) - {a.dest for a in p._actions}
        if unknown:
            p.error(f"--config {known.config}: unknown keys {sorted(unknown)}")
        p.set_defaults(**values)
    args = p.parse_args(argv)
    args.explicit = {a.dest for a in p._actions if any(s in (argv or sys.argv[1:]) for s in a.option_strings)}
    if args.resume:
        args = resume_config(args, defaults={a.dest: a.default for a in p._actions if a.dest != "help"})
    vars(args).pop("explicit", None)
    check_values(args)
    return args


# flag -> (test, what it must be); None passes where the flag's default is None
_VALID = {"batch_size": (lambda v: v >= 1, "a positive integer"), "grad_accum": (lambda v: v >= 1, "a positive integer"),
          "epochs": (lambda v: v >= 1, "a positive integer"), "max_steps": (lambda v: v >= 1, "a positive integer"),
          "samples": (lambda v: v >= 1, "a positive integer"), "lr": (lambda v: v > 0, "a positive number"),
          "warmup_steps": (lambda v: v >= 0, "0 or more"), "weight_decay": (lambda v: v >= 0, "0 or more"),
          "clip": (lambda v: v >= 0, "0 (off) or more"), "lora_r": (lambda v: v >= 1, "a positive integer"),
          "lora_alpha": (lambda v: v > 0, "a positive number"), "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "max_bad_steps": (lambda v: v >= 1, "a positive integer"), "eval_every": (lambda v: v >= 0, "0 or more"),
          "eval_samples": (lambda v: v >= 1, "a positive integer"), "eval_batch_size": (lambda v: v >= 1, "a positive integer"),
          "beam_size": (lambda v: v >= 1, "a positive integer"), "save_every": (lambda v: v >= 0, "0 or more"),
          "keep_last": (lambda v: v >= 1, "a positive integer"), "log_every": (lambda v: v >= 1, "a positive integer"),
          "num_workers": (lambda v: v >= 0, "0 or more"), "temperature": (lambda v: v > 0, "a positive number"),
          "head_layers": (lambda v: v >= 0, "0 or more"), "head_hidden": (lambda v: v >= 1, "a positive integer")}


def check_values(args) -> None:
    """One line naming the flag for a value no run can use (from the command line or from --config alike)."""
    for key, (ok, what) in _VALID.items():
        value = getattr(args, key, None)
        if value is not None and not ok(value):
            raise SystemExit(f"error: --{key.replace('_', '-')} {value}: must be {what}")
    try:
        audio_ctx_value(args.audio_ctx)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.base_8bit and args.mode != "lora":
        raise SystemExit("error: --base-8bit is for --mode lora only: it freezes the base in int8, and full "
                         "fine-tuning trains those weights (drop --base-8bit, or use --mode lora)")
    if args.add_tokens:
        try:
            parse_add_tokens(args.add_tokens)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.freeze_encoder and args.mode == "lora":
        raise SystemExit("error: --freeze-encoder is for --mode full (LoRA already freezes the base); to train no "
                         "encoder adapter, give decoder targets, e.g. --lora-targets 'decoder\\..*\\.(query|value)'")
    check_task(args)


# flags of the ASR task that a dialect-ID head (the base frozen, no LoRA) has no use for
_ASR_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "rank_strategy", "rank_spec",
             "warmup_r", "switch_step", "base_8bit", "freeze_encoder", "grad_checkpointing", "beam_size",
             "add_tokens")


def check_task(args) -> None:
    """One line for a flag the chosen --task cannot use (set on the command line or in --config)."""
    defaults = {a.dest: a.default for a in build_parser()._actions}
    if args.task == "dialect-id":
        used = [k for k in _ASR_ONLY if getattr(args, k) != defaults[k]]
        if used:
            raise SystemExit(f"error: --{used[0].replace('_', '-')} does not apply to --task dialect-id (it trains a "
                             "head on the frozen base, without LoRA): drop it")
        if args.mode != "lora":
            raise SystemExit("error: --mode full does not apply to --task dialect-id (the base stays frozen): drop it")
    elif args.head_layers is not None or args.head_hidden != defaults["head_hidden"]:
        raise SystemExit("error: --head-layers / --head-hidden are for --task dialect-id: drop them, or add --task dialect-id")


@dataclass
class Run:
    """What a run is made of, set up once before the loop: the loop reads it (and swaps the optimizer when a
    dynamic rank strategy reallocates). Where it *is* lives in TrainState."""
    args: argparse.Namespace
    config: dict
    run_dir: str
    device: str
    rank: int
    world: int
    model: Any
    train_model: Any  # the model, or its DDP wrapper
    base_fp: str
    adapter_name: str
    tokenizer: Any
    language: str
    sampler: Any
    dataset: Any
    loader: Any
    eval_dataset: Any
    eval_collator: Any
    labels: list  # the training dialects, sorted: a dialect-ID head's classes
    spec_augment: Any
    autocast: Any
    scaler: Any
    optimizer: Any
    rank_hook: Any
    n_params: tuple  # (trainable, total) as the run started
    total_steps: int
    peak_lr: float
    warmup: int
    tb: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main(argv=None, on_eval=None) -> dict:
    """Run one training run; returns its results ({} on ranks other than 0).

    on_eval(step, result), when given, is called on rank 0 after every evaluation of the model being trained
    (each --eval-every step and the final one) with that evaluation's result ({dialect: {"cer": ...}, "_macro":
    ..., "_micro": ...}): an in-process caller such as tune.py follows the run through it, and stops it by raising.
    """
    args = parse_args(argv)
    device = choose_device(args.device)
    rank, world, local_rank = init_distributed(device)  # torchrun --nproc_per_node N train.py ...
    device = f"cuda:{local_rank}" if world > 1 and device.startswith("cuda") else device
    run_dir, config = open_run_dir(args, argv, world=world, is_main=rank == 0)
    torch.manual_seed(args.seed)
    # the recipe: base model -> data -> LoRA (or all weights; its schedule needs the step count) -> optimizer -> loop
    model, base_fp = load_base(args.model, device, base_8bit=args.base_8bit)
    language = language_of(args.language, args.language_fallback)
    tokenizer = tokenizer_for(model, language)
    data = build_data(args, model, tokenizer, language, rank, world)
    total_steps = args.max_steps or math.ceil(data["micro_per_epoch"] * args.epochs / args.grad_accum)
    model, adapter_name, rank_hook = prepare_model(model, args, total_steps, device, data["labels"],
                                                   data.pop("added_tokens"), tokenizer)
    peak_lr = args.lr or (1e-3 if args.mode == "lora" else 1e-5)
    autocast, amp_dtype, use_scaler = autocast_for(args.amp, device)
    run = Run(args=args, config=config, run_dir=run_dir, device=device, rank=rank, world=world, model=model,
              train_model=wrap_ddp(model, device, world), base_fp=base_fp, adapter_name=adapter_name,
              language=language, **{k: v for k, v in data.items() if k != "micro_per_epoch"},
              spec_augment=specaugment_from_args(args), autocast=autocast,
              scaler=torch.amp.GradScaler(device.split(":")[0], enabled=use_scaler),
              optimizer=build_optimizer(model, peak_lr, args.weight_decay, device), rank_hook=rank_hook,
              n_params=count_parameters(model),
              total_steps=total_steps, peak_lr=peak_lr,
              warmup=args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * total_steps)),
              tb=open_writer(run_dir, rank == 0))
    describe(run, amp_dtype)
    state = resume(run) if args.resume and ckpt.latest_checkpoint(run_dir) else TrainState()
    if state.step == 0 and not args.no_base_eval and not args.report_memory:
        state.history["base"] = evaluate(run, "base" if args.mode == "lora" else "trained")
        log_eval(run.tb, "base", state.history["base"], 0)
    state = train(run, state, on_eval)
    return finish(run, state, on_eval) if state is not None else {}


def train(run: Run, state: TrainState, on_eval=None) -> TrainState | None:
    """The loop, one optimizer step per iteration: forward/backward over the step's micro-batches, unscale,
    clip, step; then log, evaluate, checkpoint, as their flags ask. Returns None after --report-memory."""
    args, model = run.args, run.model
    model.train()
    catch_stop_signals(state)
    log = ProgressLog(run.total_steps, initial=state.step)
    stream = micro_batches(run.loader, run.sampler, run.dataset, state.epoch, state.consumed,
                           args.batch_size * run.world, None if args.max_steps else args.epochs)
    t_start, t_last, samples, audio_s = time.time(), time.time(), 0, 0.0
    while state.step < run.total_steps:
        group = list(itertools.islice(stream, args.grad_accum))  # this step's micro-batches
        if not group:
            break  # the last epoch ended
        batches = [b for _, _, b in group]
        loss, dialect_loss = accumulate(run.train_model, batches, autocast=run.autocast, scaler=run.scaler,
                                        spec_augment=run.spec_augment, seed=args.seed, step=state.step,
                                        device=run.device, regularizer=getattr(run.rank_hook, "regularizer", None),
                                        world=run.world, task=args.task)
        samples += sum(len(b) for b in batches)
        audio_s += sum(float(b.n_frames.sum()) for b in batches) / 100

        lr = lr_at(state.step, run.total_steps, run.peak_lr, run.warmup, args.schedule)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], args.clip if args.clip > 0 else float("inf"))
        state.epoch, state.consumed = group[-1][0], group[-1][1]  # the data position after this step
        if not math.isfinite(loss) or not torch.isfinite(grad_norm):
            skip_step(run, state, loss)
            continue
        state.bad_in_row = 0
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.rank_hook is not None and run.rank_hook.update_and_allocate(state.step):
            run.optimizer = build_optimizer(model, run.peak_lr, args.weight_decay, run.device)  # new adapter tensors
            run.train_model = wrap_ddp(model, run.device, run.world)
        run.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.rng = ckpt.rng_state()
        state.train_s, t_start = state.train_s + time.time() - t_start, time.time()  # so every checkpoint holds it

        if state.step % args.log_every == 0:
            dt = max(time.time() - t_last, 1e-9)
            log_step(run, state, log, loss=loss, dialect_loss=dialect_loss, lr=lr, grad_norm=float(grad_norm),
                     samples_per_s=samples / dt, audio_per_s=audio_s / dt)
            t_last, samples, audio_s = time.time(), 0, 0.0
        if args.report_memory and state.step >= 3:
            print(f"peak memory after {state.step} steps: {peak_memory_mb(run.device):.0f} MB "
                  f"({'CUDA allocated' if run.device.startswith('cuda') else 'process RSS'})")
            return None
        if args.eval_every and state.step % args.eval_every == 0 and state.step < run.total_steps:
            result = state.history[f"step{state.step}"] = evaluate(run, "trained")
            log_eval(run.tb, "trained", result, state.step)
            keep_best(run, state, result)
            if on_eval is not None and run.is_main:
                on_eval(state.step, result)
        if args.save_every and state.step % args.save_every == 0:
            save(run, state)
        if all_sum(float(bool(state.stop)), run.world):  # any rank interrupted: all stop at this step
            save(run, state)
            run.tb.close()
            print(f"{state.stop}: saved step {state.step}; continue with: python train.py --resume {run.run_dir}")
            raise SystemExit(130)
    log.close()
    return state


def accumulate(model, batches, *, autocast, scaler, spec_augment=None, seed=0, step=0, device="cpu",
               regularizer=None, world=1, task="asr") -> tuple[float, dict]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss, and the loss of
    each dialect's clips ({dialect: mean over its units}, this process's clips only).

    The loss is the mean over every target token of the step, not a mean of per-micro-batch means:
    micro-batches hold different numbers of tokens, and only this makes 4x2 equal to a batch of 8.
    Under DDP the token count is summed over ranks and the loss multiplied by the world size, since DDP
    averages gradients: 2 processes of batch B then equal one process of batch 2B.
    For --task dialect-id the loss is the mean over the step's clips of the cross-entropy of their dialect.
    """
    n_units = max(1, all_sum(sum(int(loss_units(b, task).sum()) for b in batches), world))
    total, by_dialect = 0.0, {}  # dialect -> (summed loss, units)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        mel = batch.mel
        if spec_augment is not None and spec_augment.enabled:
            # seeded by (step, micro-step), on the CPU: the same masks after a resume and on any device
            mel = spec_augment(mel, batch.n_frames, make_generator(seed, step, i))
        # DDP: gradients are all-reduced on the last micro-step only; earlier ones just accumulate locally.
        sync = nullcontext() if world == 1 or i == len(batches) - 1 else model.no_sync()
        with sync:
            with autocast:
                logits = model(mel, batch.n_frames if task == "dialect-id" else batch.decoder_input)
            unit_loss = unit_losses(logits, batch, task)  # 0 where ignored; kept per unit for the per-dialect sums
            del logits  # backward needs only what cross-entropy saved: the [B, T, vocab] logits can go now
            loss = unit_loss.sum() / n_units
            if regularizer is not None:
                loss = loss + regularizer() / len(batches)
            scaler.scale(loss * world).backward()
        total += loss.item()
        clip_sums = unit_loss.detach().view(len(batch), -1).sum(1).tolist()
        for dialect, summed, n in zip(batch.dialects, clip_sums, loss_units(batch, task).tolist()):
            prev = by_dialect.get(dialect, (0.0, 0))
            by_dialect[dialect] = (prev[0] + summed, prev[1] + n)
    return all_sum(total, world), {d: summed / max(n, 1) for d, (summed, n) in sorted(by_dialect.items())}


def loss_units(batch, task: str) -> torch.Tensor:
    """Per clip, what a step's loss is the mean over: its target tokens (asr), or 1 for a clip of a known dialect
    (dialect-id)."""
    return ((batch.dialect_ids if task == "dialect-id" else batch.targets) != -100).view(len(batch), -1).sum(1)


def unit_losses(logits, batch, task: str) -> torch.Tensor:
    """The micro-batch's cross-entropy per unit (0 where ignored): per target token, or per clip (of its dialect)."""
    if task == "dialect-id":
        return F.cross_entropy(logits.float(), batch.dialect_ids, ignore_index=-100, reduction="none")
    # flattened to [tokens, vocab]: the [B, vocab, T] layout takes a strided path 5-10x slower
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="none")


def micro_batches(loader, sampler, dataset, epoch, consumed, batch_size, epochs):
    """Yield (epoch, consumed, batch) from (epoch, consumed) on: the data position *after* each batch.

    The sampler's order is a pure function of (seed, epoch), so a resume only needs that position.
    Batches whose clips all failed to load are passed over (their samples still count as consumed).
    """
    while epochs is None or epoch < epochs:
        sampler.set_epoch(epoch, start=consumed)
        dataset.set_epoch(epoch)
        epoch_size = sampler.num_samples_per_epoch()  # global; len(sampler) is this rank's remainder
        for batch in loader:
            consumed = min(consumed + batch_size, epoch_size)
            position = (epoch + 1, 0) if consumed >= epoch_size else (epoch, consumed)
            if batch is not None:
                yield (*position, batch)
        epoch, consumed = epoch + 1, 0


# --- set-up: each returns what the run is made of ------------------------------------------------------

def build_data(args, model, tokenizer, language: str, rank: int, world: int) -> dict:
    """The training examples in the sampler's order (this rank's share), and the test set."""
    # with --add-tokens, text length is checked after the tokens are chosen: rows only they make fit are kept
    train_examples, report = load_split(args.data, "train", language=language, strict=args.strict,
                                        check_text_length=not args.add_tokens, **data_options(args))
    print(report.summary())
    hint = report.dialect_hint()
    if not train_examples:
        raise SystemExit(f"error: --data {args.data}: no usable training rows; {hint or 'see the skipped rows above'}")
    if hint:
        print(f"note: {hint}")
    include, mode = select_dialects(args.dialect, args.sampling, sorted({e.dialect for e in train_examples}))
    added, tokenizer = choose_vocabulary(args, [e for e in train_examples if e.dialect in include], tokenizer)
    train_examples = drop_over_ctx(train_examples, tokenizer) if args.add_tokens else train_examples
    sampler = DialectSampler([e.dialect for e in train_examples], mode=mode, include=include,
                             num_samples=args.samples, temperature=args.temperature, seed=args.seed,
                             rank=rank, world_size=world, fixed_subset=args.fixed_subset)
    wave_augment = augment_from_args(args)
    n_mels = model.dims.n_mels
    audio_ctx = audio_ctx_value(args.audio_ctx)
    dataset = SpeechDataset(train_examples, n_mels=n_mels, wave_augment=wave_augment if wave_augment.enabled else None,
                            seed=args.seed)
    labels = sorted(include)
    collator = Collator(tokenizer, n_mels=n_mels, audio_ctx=audio_ctx, labels=labels)
    test_examples, test_report = load_split(args.eval_data or args.data, "test", language=language, **data_options(args))
    print(test_report.summary())
    test_examples = limit_per_dialect(test_examples, args.eval_samples)
    print(f"data {args.data}: {len(train_examples)} train rows, dialects {include} sampled {mode}, "
          f"{sampler.num_samples_per_epoch()} samples/epoch; {len(test_examples)} test clips; audio ctx {args.audio_ctx}")
    return dict(sampler=sampler, dataset=dataset,
                loader=make_loader(dataset, sampler, collator, args.batch_size, num_workers=args.num_workers),
                eval_dataset=SpeechDataset(test_examples, n_mels=n_mels),  # never augmented
                eval_collator=Collator(tokenizer, n_mels=n_mels, audio_ctx=audio_ctx),
                micro_per_epoch=math.ceil(sampler.num_samples_per_epoch() / (args.batch_size * world)),
                labels=labels, tokenizer=tokenizer, added_tokens=added)


def choose_vocabulary(args, examples, tokenizer):
    """(added tokens, the tokenizer that spells them) for --add-tokens, chosen from the text of `examples`; prints
    tokens per second of audio and rows over the decoder's positions with the default tokenizer and the new one."""
    added = ()
    if args.add_tokens:
        try:
            added = choose_tokens(args.add_tokens, [normalize_text(e.text, e.language) for e in examples], tokenizer)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
    extended = extend_tokenizer(tokenizer, added) if added else tokenizer
    print(format_token_report(token_report(examples, {"default": tokenizer, **(
        {f"+{len(added)} tokens ({args.add_tokens})": extended} if added else {})})))
    return added, extended


def drop_over_ctx(examples, tokenizer) -> list:
    """The examples whose text fits the decoder's positions with `tokenizer` (the others counted and named)."""
    fits = [decoder_length(e.text, e.language, tokenizer) <= N_TEXT_CTX for e in examples]
    if not all(fits):
        print(f"skipped {fits.count(False)} training rows whose text needs more than {N_TEXT_CTX} decoder positions "
              f"even with the added tokens (e.g. {examples[fits.index(False)].id})")
    return [e for e, ok in zip(examples, fits) if ok]


def load_split(spec: str, split: str, **kw):
    """data.sources.load_examples, with a source that cannot be read answered in one line."""
    try:
        return load_examples(spec, split, **kw)
    except (SourceError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


def prepare_model(model, args, total_steps: int, device: str, labels: list, added=(), tokenizer=None):
    """(the model to train, adapter name, rank-strategy hook or None): LoRA wrapped into the model, or every
    weight trainable, with rows for the `added` tokens (initialised from the base `tokenizer`'s pieces); for
    --task dialect-id, a head over `labels` on the frozen model."""
    if args.task == "dialect-id":
        if len(labels) < 2:
            raise SystemExit(f"error: --task dialect-id needs two or more dialects to tell apart; --dialect "
                             f"{args.dialect} trains on {labels} (use --dialect balanced or a,b)")
        head = DialectHead(labels, model.dims.n_audio_state, min(args.head_layers if args.head_layers is not None
                           else model.dims.n_audio_layer, model.dims.n_audio_layer), n_hidden=args.head_hidden)
        return DialectClassifier(model, head).to(device), "dialect_id", None
    adapter_name = args.dialect if args.dialect in DIALECTS else "default"
    rank_hook = None
    if args.mode == "lora":
        targets = args.lora_targets if "," not in args.lora_targets and "\\" not in args.lora_targets \
            else args.lora_targets.split(",")
        strategy_args = {k: v for k, v in dict(spec=args.rank_spec, warmup_r=args.warmup_r,
                                                switch_step=args.switch_step).items() if v is not None}
        if args.rank_strategy == "dynamic":
            strategy_args["total_steps"] = total_steps
        rank_hook = apply_rank_strategy(model, args.rank_strategy, name=adapter_name, targets=targets, r=args.lora_r,
                                        alpha=args.lora_alpha, dropout=args.lora_dropout, rslora=args.rslora,
                                        **strategy_args)
        model.to(device)
        if added:
            add_tokens(model, added, tokenizer, adapter=adapter_name)
        mark_only_lora_trainable(model)
    else:
        model.requires_grad_(True)
        if args.freeze_encoder:
            model.encoder.requires_grad_(False)
        if added:
            add_tokens(model, added, tokenizer)
    # also at full windows: encode() computes what whisper's encoder does (bitwise, tests/test_encoder.py)
    # with a contiguous residual stream, so no LayerNorm copies its input (~2% of a LoRA step)
    enable_dynamic_audio_ctx(model)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model, adapter_name, rank_hook


def describe(run: Run, amp_dtype) -> None:
    args = run.args
    print(f"process {run.rank} of {run.world}; " if run.world > 1 else "", end="")
    print(f"model {args.model} ({run.base_fp}) on {run.device}, precision {amp_dtype or torch.float32}, mode {args.mode}")
    print(describe_trainable(run.model))
    print(f"{run.total_steps} steps of {args.batch_size}x{args.grad_accum} clips, lr {run.peak_lr:g}, "
          f"run dir {run.run_dir}")


def resume(run: Run) -> TrainState:
    """The latest checkpoint of the run directory loaded into the model, optimizer and scaler; its TrainState."""
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run.run_dir))
    if saved["base_fingerprint"] != run.base_fp:
        raise SystemExit(f"error: --resume {run.run_dir}: the run was trained on base {saved['base_fingerprint']} but "
                         f"--model {run.args.model} is now {run.base_fp}; restore the original model file")
    if run.rank_hook is not None and "rank_hook" in saved:
        run.rank_hook.load_state_dict(saved["rank_hook"])
    run.model.load_state_dict(saved["model"], strict=False)
    run.optimizer = build_optimizer(run.model, run.peak_lr, run.args.weight_decay, run.device)  # adapter may have changed
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_checkpoint(saved)
    print(f"resumed {run.run_dir} at step {state.step} (epoch {state.epoch}, {state.consumed} samples into it)")
    return state


# --- what the loop calls -------------------------------------------------------------------------------

def catch_stop_signals(state: TrainState) -> None:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the current step."""
    if threading.current_thread() is threading.main_thread():  # a caller's worker thread keeps its own handling
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, f: setattr(state, "stop", signal.Signals(s).name))


SCALE_FLOOR = 1.0  # fp16 loss scale the scaler never backs off below: the gradient is then not scaled up at all


def skip_step(run: Run, state: TrainState, loss: float) -> None:
    """A non-finite loss or gradient: no update, counted as one of two kinds of skip.

    A scaler skip: under fp16 loss scaling, a finite loss whose gradient overflowed while the scale is above
    SCALE_FLOOR. GradScaler starts high on purpose and halves the scale at each overflow until gradients fit in
    fp16, so these are its normal business (most in a run's first steps): counted, but not bad steps.
    A bad step: a non-finite loss (scaling cannot cause one), or an overflow at the floor, where a smaller scale
    would not help (GradScaler has no floor of its own and would shrink the gradient towards zero). After
    --max-bad-steps bad steps in a row (scaler skips neither end nor extend such a run), checkpoint and stop."""
    scaling = run.scaler.is_enabled()
    scale = run.scaler.get_scale() if scaling else 1.0
    scaler_skip = scaling and math.isfinite(loss) and scale > SCALE_FLOOR
    state.skipped += 1
    state.scaler_skips += int(scaler_skip)
    state.bad_in_row += int(not scaler_skip)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.update()  # with fp16 this halves the loss scale, which is the cure for an overflow
    if scaling and run.scaler.get_scale() < SCALE_FLOOR:
        run.scaler.update(SCALE_FLOOR)
    bad = state.skipped - state.scaler_skips
    if scaler_skip:
        print(f"step {state.step}: fp16 gradient overflow at loss scale {scale}: scaler skip, scale now "
              f"{run.scaler.get_scale()} ({state.scaler_skips} scaler skips, {bad} bad steps)")
    else:
        why = (f"non-finite loss ({loss})" if not math.isfinite(loss) else
               f"fp16 gradient overflow at the loss-scale floor {SCALE_FLOOR:g}" if scaling else "non-finite gradient")
        print(f"step {state.step}: {why}, step skipped: bad step {state.bad_in_row} in a row ({bad} in total)")
    for tag, value in (("skipped_steps", state.skipped), ("scaler_skips", state.scaler_skips), ("bad_steps", bad)):
        run.tb.add_scalar(f"train/{tag}", value, state.step)
    if state.bad_in_row >= run.args.max_bad_steps:
        save(run, state)
        run.tb.close()
        raise SystemExit(f"error: {state.bad_in_row} bad steps in a row at step {state.step} (non-finite loss, or "
                         f"fp16 overflow at the loss-scale floor): lower --lr, use --amp fp32 or --clip 1.0; the last "
                         f"good state is checkpointed in {run.run_dir}")


def log_step(run: Run, state: TrainState, log: ProgressLog, *, loss, dialect_loss, lr, grad_norm, samples_per_s,
             audio_per_s):
    """TensorBoard scalars of the step just taken (the loss pooled and per dialect present in it), the progress line."""
    step, tb = state.step, run.tb
    tb.add_scalar("train/loss", loss, step)
    for dialect, value in dialect_loss.items():
        tb.add_scalar(f"train/loss/{dialect}", value, step)
    tb.add_scalar("train/lr", lr, step)
    tb.add_scalar("train/grad_norm", grad_norm, step)
    tb.add_scalar("train/loss_scale", run.scaler.get_scale() if run.scaler.is_enabled() else 1.0, step)
    tb.add_scalar("perf/samples_per_s", samples_per_s, step)
    tb.add_scalar("perf/audio_s_per_s", audio_per_s, step)
    tb.add_scalar("perf/peak_memory_mb", peak_memory_mb(run.device), step)
    for name, r in (run.rank_hook.current_ranks().items() if run.rank_hook is not None else ()):
        tb.add_scalar(f"rank/{name}", r, step)
    if run.is_main:
        log.update(step, loss, lr, samples_per_s)


def evaluate(run: Run, system: str) -> dict:
    """CER/WER per dialect of `system` ("base": the model without its adapter; "trained": as trained).

    Rank 0 evaluates while the others wait; they get {}."""
    if not run.is_main:
        torch.distributed.barrier()
        return {}
    if run.args.task == "dialect-id":
        return evaluate_dialect_id(run)
    model, lora = run.model, run.args.mode == "lora"
    activate = (lambda d: set_active_adapter(model, None if system == "base" else run.adapter_name)) if lora \
        else (lambda d: None)
    results, _ = evaluate_systems(model, run.eval_dataset, run.eval_collator, run.tokenizer, {system: activate},
                                  language=run.language, batch_size=run.args.eval_batch_size,
                                  beam_size=run.args.beam_size, device=run.device)
    if lora:
        set_active_adapter(model, run.adapter_name)
    model.train()
    if run.world > 1:
        torch.distributed.barrier()
    return results[system]


def evaluate_dialect_id(run: Run) -> dict:
    """Accuracy, per-dialect recall and the confusion matrix of the head on the test set (on rank 0, which
    evaluate() alone sends here; the others wait at the barrier)."""
    found = identify(run.model.whisper, run.model.head, run.eval_dataset, run.eval_collator,
                     batch_size=run.args.eval_batch_size, device=run.device)
    result = classification_summary([r["dialect"] for r in found], [r["predicted"] for r in found], run.labels)
    run.model.train()
    if run.world > 1:
        torch.distributed.barrier()
    return result


def save(run: Run, state: TrainState, *, is_best: bool = False) -> None:
    """A resumable checkpoint (rank 0 only): checkpoints/ckpt-STEP.pt, and checkpoints/best.pt when `is_best`."""
    if run.is_main:
        full = run.args.mode == "full"
        ckpt.save_checkpoint(run.run_dir, state.to_checkpoint(run.model, run.optimizer, run.scaler, run.sampler,
                                                              full=full, base_fingerprint=run.base_fp,
                                                              rank_hook=run.rank_hook),
                             state.step, keep_last=run.args.keep_last, is_best=is_best)


def save_model(run: Run, state: TrainState, suffix: str = "") -> None:
    """The result a user takes away: adapter{suffix}.safetensors (LoRA), model{suffix}.pt (full) or
    dialect_id{suffix}.safetensors (--task dialect-id)."""
    if run.args.task == "dialect-id":
        save_dialect_id(run.model.head, os.path.join(run.run_dir, f"dialect_id{suffix}.safetensors"),
                        base_fingerprint=run.base_fp, metadata={"config": run.config, "steps": state.step})
    elif run.args.mode == "lora":
        save_adapter(run.model, os.path.join(run.run_dir, f"adapter{suffix}.safetensors"), run.adapter_name,
                     base_fingerprint=run.base_fp,
                     metadata={"config": run.config, "dialect": run.args.dialect, "steps": state.step,
                               **added_tokens_metadata(run.model)})
    else:
        export_openai(run.model, os.path.join(run.run_dir, f"model{suffix}.pt"))


def keep_best(run: Run, state: TrainState, result: dict) -> None:
    """With --eval-every: an evaluation with a new lowest macro CER (dialect ID: error rate) saves
    checkpoints/best.pt (a resumable state) and the model as it was then (adapter_best.safetensors, model_best.pt
    or dialect_id_best.safetensors). Ties keep the earlier."""
    metric, value = score_of(result)
    prev = state.history.get("best")
    if not run.is_main or value is None or (prev is not None and value >= prev[metric]):
        return
    state.history["best"] = {"step": state.step, metric: value}  # before the checkpoint, so a resume keeps it
    save(run, state, is_best=True)
    save_model(run, state, "_best")


def score_of(result: dict) -> tuple[str, float | None]:
    """(name, value) of what --eval-every keeps the lowest of: the macro CER, or a dialect ID's error rate."""
    if "accuracy" in result:
        return "error", None if result["accuracy"] is None else 1 - result["accuracy"]
    return "macro_cer", result.get("_macro", {}).get("cer")


def finish(run: Run, state: TrainState, on_eval=None) -> dict:
    """Save the model, evaluate it, write results.json / results.md; returns the results ({} off rank 0)."""
    save(run, state)
    if run.is_main:
        save_model(run, state)
    final = evaluate(run, "trained")  # other ranks wait here for rank 0
    if not run.is_main:
        return {}
    log_eval(run.tb, "trained", final, state.step)
    if run.args.eval_every:
        keep_best(run, state, final)
    results = {"base": state.history["base"], "trained": final} if "base" in state.history else {"trained": final}
    if run.args.task == "dialect-id":
        results = {"_dialect_id": final, **({"_dialect_id_base": state.history["base"]} if "base" in state.history else {})}
    device = run.device
    write_results(run.run_dir, results, meta={
        "config": run.config, "trainable_params": run.n_params[0], "total_params": run.n_params[1], "steps": state.step, "skipped_steps": state.skipped,
        "scaler_skips": state.scaler_skips, "bad_steps": state.skipped - state.scaler_skips,
        "train_s": round(state.train_s, 1), "best": state.history.get("best"),
        "peak_memory_mb": round(peak_memory_mb(device)), "model_mb": round(storage_bytes(run.model) / 2**20, 1),
        "peak_memory_kind": "CUDA allocated" if device.startswith("cuda") else "process RSS"})
    metric, value = score_of(final)
    run.tb.add_hparams({k: v for k, v in run.config.items() if isinstance(v, (int, float, str, bool))},
                       {f"final/{metric}": value}, run_name="hparams")
    run.tb.close()
    print(format_dialect_id(final) if run.args.task == "dialect-id" else format_table(results))
    print(f"wrote {run.run_dir}/results.json and results.md")
    best = state.history.get("best")
    if best:
        kept = "dialect_id_best.safetensors" if run.args.task == "dialect-id" else \
            "adapter_best.safetensors" if run.args.mode == "lora" else "model_best.pt"
        print(f"best evaluation: step {best['step']}, {'macro CER' if metric == 'macro_cer' else 'error rate'} {best[metric]:.3f} ({kept}, checkpoints/best.pt)")
    if on_eval is not None:  # last, so a caller that stops the run here still finds it complete
        on_eval(state.step, final)
    return results


if __name__ == "__main__":
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except ModelSpecError as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: CUDA out of memory: lower --batch-size (keep the effective batch with --grad-accum), "
                 "add --grad-checkpointing, --freeze-encoder or --audio-ctx auto")
