"""Our batched decoding against openai-whisper's own decode, one clip at a time, on tiny random models."""
import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions

from conftest import make_tiny_model
from whisper_ft import decoding
from whisper_ft.decoding import Hypothesis, decode, is_looping, score_hypotheses
from whisper_ft.encoder import enable_dynamic_audio_ctx, encode

MAX = 40  # token limit for the comparisons: random models often run to it


def lively_model(seed=1, eot_scale=4.0, cross_gain=16.0, sharpness=8.0):
    """A tiny random model whose output depends on the audio and whose lengths differ per clip.

    A plain random init repeats one token whatever the audio (the tied input/output embedding makes
    the input token the most likely next one, and near-uniform cross-attention averages the audio
    away); smaller token embeddings, peaked and amplified cross-attention and a larger end-of-text
    embedding give varied tokens and sequences that end at different steps (here 5..25 tokens).
    """
    model = make_tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    eot = whisper.tokenizer.get_tokenizer(True).eot
    with torch.no_grad():
        model.decoder.token_embedding.weight.normal_(0, 0.1, generator=g)
        # whisper leaves this torch.empty (it is always loaded from a checkpoint): make it defined
        model.decoder.positional_embedding.normal_(0, 1, generator=g)
        model.decoder.token_embedding.weight[eot] *= eot_scale
        for block in model.decoder.blocks:
            block.cross_attn.out.weight.mul_(cross_gain)
            block.cross_attn.query.weight.mul_(sharpness)
            block.cross_attn.key.weight.mul_(sharpness)
    return model


def chirp(seconds, f0, f1, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds))
    return (0.5 * np.sin(phase) * np.sin(np.pi * t / seconds)).astype(np.float32)


CLIPS = [(1, 200, 2000), (2.5, 3000, 300), (4, 500, 600), (6, 100, 7000), (3, 1000, 1000), (5, 4000, 200)]


@pytest.fixture(scope="module")
def mels():
    """Log-mels of chirps of 1-6 s, padded to the 30 s window as whisper does."""
    return torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(chirp(*c))) for c in CLIPS])


def whisper_one_by_one(model, mels, beam_size=None, sample_len=MAX):
    opts = DecodingOptions(language="bo", task="transcribe", without_timestamps=True, temperature=0,
                           fp16=False, sample_len=sample_len, beam_size=beam_size)
    return [whisper.decode(model, m, opts) for m in mels]


def assert_same(ours, theirs):
    for hyps, ref in zip(ours, theirs):
        best = hyps[0]
        assert best.tokens == ref.tokens
        assert best.text == ref.text
        assert best.avg_logprob == pytest.approx(ref.avg_logprob, rel=1e-5)
        assert best.compression_ratio == pytest.approx(ref.compression_ratio)


@pytest.fixture(params=[None, 0.0, 1.01], ids=["default", "compact-always", "compact-never"])
def compaction(request, monkeypatch):
    """Finished rows are dropped from the batch lazily; results must not depend on when."""
    if request.param is not None:
        monkeypatch.setattr(decoding, "COMPACT_FRACTION", request.param)


def test_batched_greedy_matches_whisper_decode(tokenizer, mels, compaction):
    model = lively_model()
    ours = decode(model, mels, tokenizer, max_tokens=MAX, loop_guard=False)
    theirs = whisper_one_by_one(model, mels)
    assert_same(ours, theirs)
    lengths = [len(h[0].tokens) for h in ours]
    assert len(set(lengths)) > 1, "clips should end at different steps to exercise row dropping"
    assert all(len(h) == 1 and isinstance(h[0], Hypothesis) for h in ours)
    assert [h[0].truncated for h in ours] == [n == MAX for n in lengths]


def test_batched_greedy_with_dynamic_ctx_matches_whisper_on_patched_encoder(tokenizer, mels):
    model = lively_model()
    short = mels[:, :, :600]  # first 6 s of every clip
    ours = decode(model, short, tokenizer, max_tokens=MAX, loop_guard=False)
    with enable_dynamic_audio_ctx(model):  # whisper.decode then encodes the short window too
        theirs = whisper_one_by_one(model, short)
    assert_same(ours, theirs)


def test_30s_features_are_whisper_encoders_and_a_hooked_encoder_still_runs(mels):
    model = lively_model()
    with torch.no_grad():
        plain = decoding.audio_features_for(model, mels[:2])
        assert torch.equal(plain, model.encoder(mels[:2]))  # encode() ran: bitwise the same
        # a forward hook on the encoder changes its output: decode must go through the encoder then
        handle = model.encoder.register_forward_hook(lambda mod, inp, out: out * 0)
        try:
            assert torch.count_nonzero(decoding.audio_features_for(model, mels[:2])) == 0
            assert torch.equal(decoding.audio_features_for(model, mels[:2, :, :600]),
                               encode(model, mels[:2, :, :600]))  # shorter: only encode() can
        finally:
            handle.remove()


def test_timestamp_mode_matches_whisper(tokenizer, mels):
    model = lively_model()
    ours = decode(model, mels[:3], tokenizer, max_tokens=MAX, loop_guard=False, timestamps=True)
    opts = DecodingOptions(language="bo", without_timestamps=False, fp16=False, sample_len=MAX)
    theirs = [whisper.decode(model, m, opts) for m in mels[:3]]
    assert_same(ours, theirs)
    assert any(t >= tokenizer.timestamp_begin for h in ours for t in h[0].tokens)


def test_precomputed_audio_features_give_the_same_result(tokenizer, mels):
    model = lively_model()
    with torch.no_grad():
        feats = encode(model, mels[:3, :, :1000])
    a = decode(model, None, tokenizer, audio_features=feats, max_tokens=MAX)
    b = decode(model, mels[:3, :, :1000], tokenizer, max_tokens=MAX)
    assert [h[0].tokens for h in a] == [h[0].tokens for h in b]


def test_beam_search_matches_whisper_beam_search(tokenizer, mels, compaction):
    model = lively_model()
    ours = decode(model, mels, tokenizer, beam_size=5, nbest=5, max_tokens=MAX, loop_guard=False)
    theirs = whisper_one_by_one(model, mels, beam_size=5)
    assert_same(ours, theirs)
    for hyps in ours:
        assert 1 <= len(hyps) <= 5
        ranks = [h.sum_logprob / len(h.tokens) for h in hyps]  # whisper's length normalisation
        assert ranks == sorted(ranks, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_beam_search_with_length_penalty_matches_whisper(tokenizer, mels):
    model = lively_model(eot_scale=3.0, cross_gain=8.0)
    ours = decode(model, mels[:3], tokenizer, beam_size=3, max_tokens=MAX, length_penalty=0.6,
                  loop_guard=False)
    opts = DecodingOptions(language="bo", without_timestamps=True, fp16=False, sample_len=MAX,
                           beam_size=3, length_penalty=0.6)
    assert_same(ours, [whisper.decode(model, m, opts) for m in mels[:3]])


def test_loop_guard_flags_and_stops_a_repeating_model(tokenizer, mels):
    model = make_tiny_model()  # a plain random init repeats one token until the limit
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    free = decode(model, mels[:2], tokenizer, max_tokens=100, loop_guard=False)
    guarded = decode(model, mels[:2], tokenizer, max_tokens=100)
    for f, g in zip(free, guarded):
        assert f[0].looped and len(f[0].tokens) == 100  # flagged even when not stopped
        assert g[0].looped and not g[0].truncated
        assert len(g[0].tokens) < 100  # stopped early
        assert g[0].tokens == f[0].tokens[: len(g[0].tokens)]
    beam = decode(model, mels[:2], tokenizer, beam_size=3, nbest=3, max_tokens=100)
    assert all(h[0].looped and len(h[0].tokens) < 100 for h in beam)


def test_is_looping():
    assert is_looping([7] * 32)
    assert not is_looping([7] * 31)
    assert is_looping([1, 2, 3, 4] * 8)
    assert not is_looping(list(range(100)))
    assert is_looping([1], "ab" * 40)  # whisper's compression-ratio criterion on the text
    assert not is_looping([1], "a short ordinary sentence")


def test_max_tokens_caps_every_hypothesis(tokenizer, mels):
    model = lively_model()
    for beam in (1, 3):
        out = decode(model, mels, tokenizer, beam_size=beam, max_tokens=3)
        assert all(len(h.tokens) <= 3 for hyps in out for h in hyps)


def test_score_hypotheses_matches_plain_forward(tokenizer, mels):
    model = lively_model()
    with torch.no_grad():
        feats = model.encoder(mels[:2])
    seqs = [[[1467, 5782], [26263], []], [[5782, 29040, 29040]]]
    got = score_hypotheses(model, feats, tokenizer, seqs)
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    for b, row in enumerate(seqs):
        for seq, score in zip(row, got[b]):
            with torch.no_grad():
                logp = model.decoder(torch.tensor([prefix + seq]), feats[b: b + 1]).log_softmax(-1)[0]
            target = seq + [tokenizer.eot]
            want = sum(logp[len(prefix) - 1 + k, t].item() for k, t in enumerate(target))
            assert score == pytest.approx(want, rel=1e-5)
    no_eot = score_hypotheses(model, feats, tokenizer, seqs, include_eot=False)
    assert no_eot[1][0] > got[1][0]


def test_score_hypotheses_with_suppression_reproduces_decode_logprobs(tokenizer, mels):
    model = lively_model()
    with torch.no_grad():
        feats = model.encoder(mels)
    out = decode(model, None, tokenizer, audio_features=feats, beam_size=3, nbest=3, max_tokens=MAX,
                 loop_guard=False)
    ended = [[h for h in hyps if not h.truncated] for hyps in out]
    scores = score_hypotheses(model, feats, tokenizer, [[h.tokens for h in hs] for hs in ended],
                              suppress=True)
    for hs, ss in zip(ended, scores):
        for h, s in zip(hs, ss):
            assert s == pytest.approx(h.sum_logprob, rel=1e-4)


def test_bad_arguments_are_named(tokenizer, mels):
    model = lively_model()
    assert decode(model, mels[:0], tokenizer) == []
    with pytest.raises(ValueError, match="nbest"):
        decode(model, mels, tokenizer, nbest=2)
    with pytest.raises(ValueError, match="frames"):
        decode(model, mels[:, :, :999], tokenizer)
    with pytest.raises(ValueError, match="mel or audio_features"):
        decode(model, None, tokenizer)
    with pytest.raises(ValueError, match="English-only"):
        decode(model, mels, whisper.tokenizer.get_tokenizer(False))
    no_language = whisper.tokenizer.Tokenizer(tokenizer.encoding, num_languages=99)
    with pytest.raises(ValueError, match="no language"):
        decode(model, mels, no_language)
    with pytest.raises(ValueError, match="clips"):
        score_hypotheses(model, torch.zeros(2, 10, 64), tokenizer, [[[1]]])
    with pytest.raises(ValueError, match="n_text_ctx"):
        score_hypotheses(model, torch.zeros(1, 10, 64), tokenizer, [[[1] * 445]])


def test_bf16_runs_the_encoder_and_cross_attention_in_bf16_once(tokenizer, mels):
    model = lively_model()
    seen = []
    hooks = [b.cross_attn.key.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
             for b in model.decoder.blocks]
    try:
        fp32 = decode(model, mels, tokenizer, max_tokens=MAX)
        assert set(seen) == {torch.float32}
        seen.clear()
        bf16 = decode(model, mels, tokenizer, max_tokens=MAX, precision="bf16")
        assert set(seen) == {torch.bfloat16} and len(seen) == len(model.decoder.blocks)  # once per block, not per step
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        a, b = decoding.audio_features_for(model, mels), decoding.audio_features_for(model, mels, "bf16")
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # cast back, but computed in bf16
    assert (a - b).norm() / a.norm() < 0.02
    # the same search from precomputed bf16 features (how transcribe.py calls it); how often the text stays the
    # same as fp32's is a property of the trained model, measured by bench/bench_decode.py (base: 16/16 clips)
    again = decode(model, None, tokenizer, audio_features=b, max_tokens=MAX, precision="bf16")
    assert [h[0].tokens for h in again] == [h[0].tokens for h in bf16]
    assert len(fp32) == len(bf16) == len(CLIPS)
    with pytest.raises(ValueError, match="precision 'fp16': expected one of fp32, bf16"):
        decode(model, mels, tokenizer, precision="fp16")
