"""Batched decoding with the KV cache: greedy, beam search and N-best lists, plus teacher-forced scoring.

The search rules are openai-whisper's (`whisper.decoding`), so results match `whisper.decode` with
`without_timestamps=True, temperature=0` (greedy) or `beam_size=k`: the same forced prefix
`<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>` (taken from the tokenizer, which carries
language and task), the same default suppression (`"-1"`: non-speech symbols and special tokens;
blank and end-of-text at the first step) and the same token limit (224 = n_text_ctx // 2).

What is different, and why it is faster:
- a sequence that has ended leaves the batch (its rows are dropped from the KV cache), while whisper
  keeps appending end-of-text to it until the last sequence of the batch is done;
- a hallucination loop (repeated n-gram, or whisper's compression ratio > 2.4) stops that sequence
  early and is flagged `looped`, instead of running to the token limit;
- `mel` may be shorter than 30 s (see `whisper_ft.encoder`);
- precision="bf16" runs the encoder and the cross-attention keys and values (the GEMMs over every audio
  position, ~85% of the work at 30 s) under bf16 autocast; the step-by-step decoder stays in the model's
  dtype, where bf16 is no faster on a CPU (small GEMMs) and where the search's choices are made.
"""
import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from whisper.decoding import ApplyTimestampRules
from whisper.model import AudioEncoder
from whisper.utils import compression_ratio

from .encoder import check_mel, encode
from .text import MULTILINGUAL_VOCAB, vocab_size

COMPRESSION_RATIO_THRESHOLD = 2.4  # whisper's transcribe() treats text above this as a failed decode
LOOP_MIN_SPAN = 32  # tokens: a periodic tail this long, ...
LOOP_MIN_REPEATS = 3  # ... holding at least this many copies of its period, is a loop
LOOP_MAX_PERIOD = 16
# Finished rows stay in the batch (fed end-of-text, their output ignored, as whisper does) until they
# are this fraction of it: compacting copies every live row's cache, which costs about two decoder
# steps per row at a 30 s context, so dropping one row at a time would cost more than it saves.
COMPACT_FRACTION = 1 / 8
PRECISIONS = ("fp32", "bf16")


@dataclass
class Hypothesis:
    tokens: List[int]  # text tokens: no prefix, no end-of-text
    text: str
    sum_logprob: float  # under the filtered (suppressed) distribution, end-of-text included, as whisper
    avg_logprob: float  # sum_logprob / (len(tokens) + 1), as whisper
    compression_ratio: float
    looped: bool  # repetition loop detected (stopped early when loop_guard is on)
    truncated: bool = False  # neither end-of-text nor loop: stopped by max_tokens


def is_looping(tokens: Sequence[int], text: Optional[str] = None) -> bool:
    """True for a hallucination loop: a periodic tail (any period <= 16) of >= 32 tokens and >= 3
    copies, or decoded text whose zlib compression ratio exceeds whisper's 2.4.

    The token test catches loops on tokens that decode to nothing (e.g. timestamps in text mode);
    the text test is whisper's own failure criterion.
    """
    n = len(tokens)
    for p in range(1, LOOP_MAX_PERIOD + 1):
        span = max(LOOP_MIN_SPAN, p * LOOP_MIN_REPEATS)
        if n < span:
            break
        tail = tokens[n - span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return text is not None and compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD


def suppress_tokens(tokenizer) -> List[int]:
    """Whisper's default `suppress_tokens="-1"` set: non-speech symbols plus the special tokens."""
    ids = set(tokenizer.non_speech_tokens)
    ids.update([tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                tokenizer.sot_lm])
    if tokenizer.no_speech is not None:
        ids.add(tokenizer.no_speech)
    return sorted(ids)


class _Filters:
    """Whisper's logit filters as precomputed masks (SuppressTokens always, SuppressBlank at step 0), plus any id
    the tokenizer cannot spell (rows a model has for tokens added to another vocabulary)."""

    def __init__(self, tokenizer, n_vocab, device, sample_begin, timestamps):
        self.mask = torch.zeros(n_vocab, dtype=torch.bool, device=device)
        self.mask[suppress_tokens(tokenizer)] = True
        self.mask[vocab_size(tokenizer):] = True
        self.first = self.mask.clone()
        self.first[tokenizer.encode(" ") + [tokenizer.eot]] = True
        self.sample_begin = sample_begin
        # timestamps: whisper's own rule object (max initial timestamp 1.0 s = index 50)
        self.timestamps = ApplyTimestampRules(tokenizer, sample_begin, 50) if timestamps else None

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        first = tokens.shape[1] == self.sample_begin
        logits.masked_fill_(self.first if first else self.mask, float("-inf"))
        if self.timestamps is not None:
            self.timestamps.apply(logits, tokens)


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _n_logits(model) -> int:
    """Width of the logits: the token embedding's rows (with added tokens, those the active adapter has)."""
    return model.decoder.token_embedding.num_embeddings


def _check_tokenizer(model, tokenizer) -> None:
    multilingual = "multilingual" in tokenizer.encoding.name
    # not model.is_multilingual: it reads n_vocab, which added tokens (whisper_ft/vocab.py) enlarge
    if multilingual != (model.dims.n_vocab - len(getattr(model, "added_tokens", ())) >= MULTILINGUAL_VOCAB):
        raise ValueError(f"tokenizer is {'multilingual' if multilingual else 'English-only'} but the model "
                         f"is not: build it with whisper_ft.text.tokenizer_for(model, language)")
    if multilingual and (tokenizer.language is None or tokenizer.task is None):
        raise ValueError("tokenizer has no language or task to force: build it with "
                         "get_tokenizer(multilingual=True, language=..., task='transcribe')")


def _prefix(tokenizer, timestamps: bool) -> List[int]:
    return list(tokenizer.sot_sequence if timestamps else tokenizer.sot_sequence_including_notimestamps)


def precision_context(model, precision: str):
    """The context the heavy GEMMs run in: bf16 autocast on the model's device, or nothing for fp32 (an outer
    autocast, such as train.py's AMP, then still applies)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def audio_features_for(model, mel: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Encoder output for mel [B, n_mels, T] in the model's dtype, by `encode`: bitwise whisper's
    encoder at T=3000 but ~7% faster there (see encode), and the dynamic context for shorter T.
    An encoder whose forward was replaced, overridden or hooked runs itself at T=3000, so its change
    applies (submodule wrappers such as LoRA or int8 layers need no such care: encode calls them).
    precision="bf16" runs it under bf16 autocast (weights stay as they are; the output is cast back)."""
    if mel.ndim == 2:
        mel = mel.unsqueeze(0)
    check_mel(model, mel)
    dtype = _model_dtype(model)
    mel = mel.to(model.device, dtype)
    enc = model.encoder
    custom = ("forward" in vars(enc) or type(enc).forward is not AudioEncoder.forward
              or enc._forward_hooks or enc._forward_pre_hooks)
    with precision_context(model, precision):
        if custom and mel.shape[-1] == 2 * model.dims.n_audio_ctx:
            return enc(mel).to(dtype)
        return encode(model, mel).to(dtype)


class _Cache:
    """The decoder's KV cache, filled by whisper's forward hooks on every attention `key`/`value`.

    The hooks must sit on the key/value projection modules (whatever wraps them, e.g. a LoRA layer,
    as long as the attribute names stay): `MultiHeadAttention.forward` looks its cross-attention
    entries up by those very modules, and the self-attention hooks concatenate each new step's keys to
    the cached ones, so each step only feeds the newest token. Rows are reordered or dropped in place:
    the hooks hold a reference to this dict, and `TextDecoder.forward` reads the position offset from
    its first entry (the first self-attention key), so neither identity nor order may change.

    The cross-attention keys and values are computed here, once, from xa (whisper computes them at the
    first step: the same modules on the same input), so that they can run in `precision`; the
    self-attention entries start empty, in front, to keep the position offset at 0 for the first step.
    """

    def __init__(self, model, xa: torch.Tensor, precision: str = "fp32"):
        blocks = model.decoder.blocks
        with precision_context(model, precision):
            cross = {m: m(xa).to(xa.dtype) for b in blocks for m in (b.cross_attn.key, b.cross_attn.value)}
        self.kv, self.hooks = model.install_kv_cache_hooks()
        self.self_attn = {m for b in blocks for m in (b.attn.key, b.attn.value)}
        empty = xa.new_zeros(xa.shape[0], 0, model.dims.n_text_state)
        self.kv.update({m: empty for b in blocks for m in (b.attn.key, b.attn.value)})
        self.kv.update(cross)

    def select(self, rows: torch.Tensor, self_attn_only: bool = False) -> None:
        """Keep/reorder batch rows. Beam reordering within a clip only needs the self-attention
        entries (a clip's cross-attention rows are identical), as in whisper; dropping rows needs all,
        and the cross-attention ones dominate (n_audio_ctx x n_state x 2 per layer and row)."""
        for module in self.kv:
            if not self_attn_only or module in self.self_attn:
                self.kv[module] = self.kv[module][rows]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.kv.clear()


@torch.no_grad()
def decode(model, mel: Optional[torch.Tensor], tokenizer, *, beam_size: int = 1, nbest: int = 1,
           max_tokens: int = 224, length_penalty: Optional[float] = None,
           audio_features: Optional[torch.Tensor] = None, loop_guard: bool = True,
           timestamps: bool = False, precision: str = "fp32") -> List[List[Hypothesis]]:
    """Decode a batch; returns, per clip, up to `nbest` hypotheses sorted best first.

    mel: [B, n_mels, T] (T even, <= 3000; shorter uses the dynamic encoder context), or None when
    `audio_features` [B, frames, n_audio_state] are given. beam_size == 1 is greedy (nbest must be 1).
    Ranking as whisper: sum_logprob / length, or / ((5 + length) / 6) ** length_penalty.
    loop_guard stops a looping sequence early; `looped` is reported either way.
    precision: "fp32" (the model's dtype throughout) or "bf16" (encoder and cross-attention keys and values
    under bf16 autocast: ~1.8x faster at 30 s windows on a CPU with avx512_bf16, see bench/README.md).
    """
    if beam_size < 1 or not 1 <= nbest <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got beam_size={beam_size}, "
                         f"nbest={nbest}")
    if length_penalty is not None and not 0 <= length_penalty <= 1:
        raise ValueError(f"length_penalty (alpha) must be in [0, 1] or None, got {length_penalty}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    precision_context(model, precision)  # checks the name before any work
    _check_tokenizer(model, tokenizer)
    if timestamps and getattr(tokenizer, "added", ()):
        raise ValueError("timestamps with added tokens are not supported: whisper's timestamp rules treat every id "
                         "after the first timestamp as one")
    if audio_features is None:
        if mel is None:
            raise ValueError("pass mel or audio_features")
        if mel.ndim == 3 and mel.shape[0] == 0:
            return []
        audio_features = audio_features_for(model, mel, precision)
    else:
        audio_features = audio_features.to(model.device, _model_dtype(model))
    if audio_features.shape[0] == 0:
        return []
    prefix = _prefix(tokenizer, timestamps)
    # whisper also stops when the whole context is full
    max_tokens = min(max_tokens, model.dims.n_text_ctx - len(prefix))
    filters = _Filters(tokenizer, _n_logits(model), audio_features.device, len(prefix), timestamps)
    search = _greedy if beam_size == 1 else _beam
    return search(model, audio_features, tokenizer, prefix, filters, beam_size, nbest, max_tokens,
                  length_penalty, loop_guard, precision)


@torch.no_grad()
def no_speech_probs(model, audio_features: torch.Tensor, tokenizer) -> List[float]:
    """P(<|nospeech|>) per clip, as whisper computes it: the softmax at the <|startoftranscript|> position of
    the forced prefix (one decoder pass over the prefix, no cache). 0.0 for a model without that token."""
    _check_tokenizer(model, tokenizer)
    if tokenizer.no_speech is None:
        return [0.0] * audio_features.shape[0]
    xa = audio_features.to(model.device, _model_dtype(model))
    prefix = torch.tensor([_prefix(tokenizer, False)] * xa.shape[0], device=xa.device)
    logits = model.decoder(prefix, xa)[:, list(tokenizer.sot_sequence).index(tokenizer.sot)]
    return logits.float().softmax(dim=-1)[:, tokenizer.no_speech].tolist()


def _hypothesis(tokenizer, tokens, sum_logprob, looped, truncated) -> Hypothesis:
    text = tokenizer.decode(tokens).strip()
    looped = looped or is_looping(tokens, text)
    return Hypothesis(tokens=tokens, text=text, sum_logprob=float(sum_logprob),
                      avg_logprob=float(sum_logprob) / (len(tokens) + 1),
                      compression_ratio=compression_ratio(text), looped=looped,
                      truncated=truncated and not looped)


def _greedy(model, xa, tokenizer, prefix, filters, _beam_size, _nbest, max_tokens, _lp, loop_guard, precision):
    n = xa.shape[0]
    eot = tokenizer.eot
    device = xa.device
    tokens = torch.tensor([prefix] * n, device=device)
    rows = torch.arange(n, device=device)  # clip index of each batch row
    alive = [True] * n  # per batch row: still decoding
    sum_logprobs = torch.zeros(n, device=device)
    out_tokens: List[List[int]] = [[] for _ in range(n)]
    looped = [False] * n
    ended = [False] * n
    cache = _Cache(model, xa, precision)
    try:
        x = tokens
        for _ in range(max_tokens):
            logits = model.decoder(x, xa, kv_cache=cache.kv)[:, -1]
            filters.apply(logits, tokens)
            next_tokens = logits.argmax(dim=-1)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            lp = logprobs.gather(1, next_tokens[:, None])[:, 0]
            alive_t = torch.tensor(alive, device=device)
            sum_logprobs[rows] += torch.where(alive_t, lp, torch.zeros_like(lp))
            next_tokens = torch.where(alive_t, next_tokens, torch.full_like(next_tokens, eot))
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)

            for r, (i, t) in enumerate(zip(rows.tolist(), next_tokens.tolist())):
                if not alive[r]:
                    continue
                if t == eot:
                    ended[i], alive[r] = True, False
                    continue
                out_tokens[i].append(t)
                if loop_guard and len(out_tokens[i]) >= 8 and is_looping(out_tokens[i],
                                                                         tokenizer.decode(out_tokens[i])):
                    looped[i], alive[r] = True, False
            n_alive = sum(alive)
            if n_alive == 0:
                break
            if len(alive) - n_alive >= COMPACT_FRACTION * len(alive):
                keep = torch.tensor([r for r, a in enumerate(alive) if a], device=device)
                cache.select(keep)
                xa, rows, tokens, next_tokens = xa[keep], rows[keep], tokens[keep], next_tokens[keep]
                alive = [True] * n_alive
            x = next_tokens[:, None]
    finally:
        cache.close()
    sums = sum_logprobs.tolist()
    return [[_hypothesis(tokenizer, out_tokens[i], sums[i], looped[i], not ended[i])] for i in range(n)]


def _beam(model, xa, tokenizer, prefix, filters, beam_size, nbest, max_tokens, length_penalty,
          loop_guard, precision):
    """Whisper's BeamSearchDecoder (patience 1), with finished clips leaving the batch.

    Per clip and step: each live beam proposes its top beam_size + 1 tokens; candidates are ranked by
    cumulative log-probability; those ending in end-of-text (or, with loop_guard, looping) join the
    clip's finished list until it holds beam_size, the best beam_size others live on. A clip is done
    when its finished list is full; whisper keeps computing such a clip until the whole batch is done
    but never changes its result, so dropping it is exact.
    """
    n = xa.shape[0]
    eot = tokenizer.eot
    device = xa.device
    p = len(prefix)
    xa = xa.repeat_interleave(beam_size, dim=0)
    tokens = torch.tensor([prefix] * (n * beam_size), device=device)
    sum_logprobs = torch.zeros(n * beam_size, device=device)
    groups: List[Optional[int]] = list(range(n))  # clip of each group of beam_size rows; None: done
    finished = [dict() for _ in range(n)]  # clip -> {token tuple incl. prefix: sum_logprob}
    loops = [set() for _ in range(n)]  # finished sequences that were stopped as loops
    cache = _Cache(model, xa, precision)
    try:
        x = tokens
        for _ in range(max_tokens):
            logits = model.decoder(x, xa, kv_cache=cache.kv)[:, -1]
            filters.apply(logits, tokens)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            top_lp, top_tok = logprobs.topk(beam_size + 1)
            # float32 sums, as whisper's `(sum_logprobs[idx] + logprob).item()`
            cand_scores = (sum_logprobs[:, None] + top_lp).tolist()
            top_tok = top_tok.tolist()
            prev = tokens.tolist()

            next_seqs, sources, next_scores = [], [], []
            for g, clip in enumerate(groups):
                rows_g = range(g * beam_size, (g + 1) * beam_size)
                if clip is not None:
                    scores, source = {}, {}
                    for idx in rows_g:
                        for score, tok in zip(cand_scores[idx], top_tok[idx]):
                            seq = tuple(prev[idx] + [tok])
                            scores[seq] = score
                            source[seq] = idx
                    saved, new_finished, kept = 0, {}, []
                    for seq in sorted(scores, key=scores.get, reverse=True):
                        if seq[-1] == eot:
                            new_finished[seq] = scores[seq]
                        elif loop_guard and len(seq) - p >= 8 and is_looping(
                                seq[p:], tokenizer.decode(list(seq[p:]))):
                            new_finished[seq] = scores[seq]
                            loops[clip].add(seq)
                        else:
                            kept.append(seq)
                            saved += 1
                            if saved == beam_size:
                                break
                    for seq in sorted(new_finished, key=new_finished.get, reverse=True):
                        if len(finished[clip]) >= beam_size:
                            break
                        finished[clip][seq] = new_finished[seq]
                    # a clip can only run short of live candidates when nearly all of them finished,
                    # which also fills its finished list
                    if len(finished[clip]) < beam_size and len(kept) == beam_size:
                        next_seqs.extend(kept)
                        sources.extend(source[s] for s in kept)
                        next_scores.extend(scores[s] for s in kept)
                        continue
                    groups[g] = None
                # a done clip idles in place (fed end-of-text) until the batch is compacted
                next_seqs.extend(tuple(prev[idx] + [eot]) for idx in rows_g)
                sources.extend(rows_g)
                next_scores.extend(0.0 for _ in rows_g)
            n_live = sum(c is not None for c in groups)
            if n_live == 0:
                break
            src = torch.tensor(sources, device=device)
            tokens = torch.tensor(next_seqs, device=device)
            sum_logprobs = torch.tensor(next_scores, device=device)
            if len(groups) - n_live >= COMPACT_FRACTION * len(groups):
                live = [g for g, c in enumerate(groups) if c is not None]
                keep = torch.tensor([g * beam_size + j for g in live for j in range(beam_size)], device=device)
                # reorder, then drop done clips' rows everywhere (cross-attention rows included)
                cache.select(src[keep])
                xa, tokens, sum_logprobs = xa[keep], tokens[keep], sum_logprobs[keep]
                groups = [groups[g] for g in live]
            else:
                cache.select(src, self_attn_only=True)  # reorder beams within their clips
            x = tokens[:, -1:]
    finally:
        cache.close()

    # clips cut by max_tokens: top up with their best live beams, as whisper's finalize()
    truncated = [set() for _ in range(n)]
    scores_now = sum_logprobs.view(len(groups), beam_size).cpu()
    seqs_now = tokens.view(len(groups), beam_size, -1).tolist()
    for g, clip in enumerate(groups):
        if clip is None:
            continue
        for j in scores_now[g].argsort(descending=True, stable=True).tolist():
            if len(finished[clip]) >= beam_size:
                break
            seq = tuple(seqs_now[g][j]) + (eot,)
            finished[clip][seq] = scores_now[g][j].item()
            truncated[clip].add(seq)

    results = []
    for clip in range(n):
        hyps = []
        for seq, score in finished[clip].items():
            text_tokens = list(seq[p:])
            if eot in text_tokens:  # whisper slices at the first end-of-text
                text_tokens = text_tokens[: text_tokens.index(eot)]
            rank = score / _penalty(len(text_tokens), length_penalty)
            hyps.append((rank, _hypothesis(tokenizer, text_tokens, score, seq in loops[clip],
                                           seq in truncated[clip])))
        hyps.sort(key=lambda h: h[0], reverse=True)  # stable: ties keep whisper's first-max choice
        results.append([h for _, h in hyps[:nbest]])
    return results


def _penalty(length: int, length_penalty: Optional[float]) -> float:
    if length_penalty is None:
        return length
    return ((5 + length) / 6) ** length_penalty  # Google NMT, as whisper's MaximumLikelihoodRanker


def _decoder_hidden(model, tokens: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """`TextDecoder.forward` without the vocabulary projection (no KV cache): hidden states
    [B * L, n_text_state], so a caller can project only the positions it needs."""
    dec = model.decoder
    x = dec.token_embedding(tokens) + dec.positional_embedding[: tokens.shape[-1]]
    x = x.to(xa.dtype)
    for block in dec.blocks:
        x = block(x, xa, mask=dec.mask)
    return dec.ln(x).reshape(-1, x.shape[-1])


@torch.no_grad()
def score_hypotheses(model, audio_features: torch.Tensor, tokenizer,
                     token_seqs: Sequence[Sequence[Sequence[int]]], *, include_eot: bool = True,
                     suppress: bool = False, timestamps: bool = False,
                     chunk: int = 512) -> List[List[float]]:
    """Sequence log-probabilities log p(tokens [+ eot] | prefix, audio) under the model, by teacher
    forcing all sequences in one batched decoder forward.

    token_seqs[b] is a list of text-token sequences (as `Hypothesis.tokens`) for clip b of
    audio_features [B, frames, n_audio_state]. With suppress=True the distribution is filtered like
    decode()'s, which reproduces `Hypothesis.sum_logprob`; the default scores the plain model, so a
    perturbed hypothesis holding a suppressed symbol still gets a finite score.
    """
    if len(token_seqs) != audio_features.shape[0]:
        raise ValueError(f"token_seqs has {len(token_seqs)} clips but audio_features has "
                         f"{audio_features.shape[0]}")
    _check_tokenizer(model, tokenizer)
    prefix = _prefix(tokenizer, timestamps)
    p = len(prefix)
    flat = [(b, list(seq)) for b, seqs in enumerate(token_seqs) for seq in seqs]
    if not flat:
        return [[] for _ in token_seqs]
    n_vocab, n_ctx = _n_logits(model), model.dims.n_text_ctx
    targets = [seq + [tokenizer.eot] if include_eot else seq for _, seq in flat]
    for (b, seq), tgt in zip(flat, targets):
        if any(not 0 <= t < n_vocab for t in seq):
            raise ValueError(f"clip {b}: token ids must be in [0, {n_vocab})")
        if p + len(tgt) > n_ctx:
            raise ValueError(f"clip {b}: {p} prefix + {len(tgt)} tokens exceed n_text_ctx={n_ctx}")
    device = model.device
    xa = audio_features.to(device, _model_dtype(model))
    width = p + max(len(t) for t in targets)
    # right padding with end-of-text: the causal mask keeps it from touching the scored positions
    inputs = torch.full((len(flat), width), tokenizer.eot, dtype=torch.long, device=device)
    pos, tgt_ids, owner = [], [], []
    for r, ((_, seq), tgt) in enumerate(zip(flat, targets)):
        row = prefix + seq
        inputs[r, : len(row)] = torch.tensor(row)
        # the logit at position k predicts token k + 1
        for k, t in enumerate(tgt):
            pos.append(r * width + p - 1 + k)
            tgt_ids.append(t)
            owner.append(r)
    rows_xa = xa[torch.tensor([b for b, _ in flat], device=device)]
    pos_t = torch.tensor(pos, device=device)
    tgt_t = torch.tensor(tgt_ids, device=device)
    if suppress and timestamps:
        raise NotImplementedError("suppress=True with timestamps=True is not supported")
    filters = _Filters(tokenizer, n_vocab, device, p, False) if suppress else None
    at_first = torch.tensor([q % width == p - 1 for q in pos], device=device)  # SuppressBlank's step

    # hidden states in one forward; the vocabulary projection in chunks of positions, so a long
    # N-best list never materialises [rows, width, n_vocab] logits
    hidden = _decoder_hidden(model, inputs, rows_xa)
    weight = model.decoder.token_embedding.weight.to(hidden.dtype)
    token_lp = torch.empty(len(pos), device=device)
    for s in range(0, len(pos), chunk):
        sl = slice(s, s + chunk)
        logits = (hidden[pos_t[sl]] @ weight.T).float()
        if filters is not None:
            logits.masked_fill_(torch.where(at_first[sl, None], filters.first, filters.mask),
                                float("-inf"))
        token_lp[sl] = logits.log_softmax(-1).gather(1, tgt_t[sl, None])[:, 0]

    per_row = torch.zeros(len(flat), device=device).index_add_(0, torch.tensor(owner, device=device),
                                                               token_lp).tolist()
    out, r = [], 0
    for seqs in token_seqs:
        out.append(per_row[r: r + len(seqs)])
        r += len(seqs)
    return out
