"""DialectSampler: exact balanced counts, weighted shares, determinism, resume, disjoint ranks."""
from collections import Counter

import pytest

from data.samplers import DialectSampler

# 600 Utsang, 150 Amdo, 30 Kham: a skew like the real corpora
LABELS = ["utsang"] * 600 + ["amdo"] * 150 + ["kham"] * 30
LABELS = [LABELS[(i * 7) % len(LABELS)] for i in range(len(LABELS))]  # interleave (7 is coprime to 780)


def counts(sampler, epoch=0):
    return Counter(LABELS[i] for i in sampler.epoch_indices(epoch))


def test_balanced_exact_counts_with_upsampling():
    s = DialectSampler(LABELS, mode="balanced", num_samples=1500)
    idx = s.epoch_indices(0)
    assert len(idx) == 1500 == len(s)
    assert counts(s) == {"utsang": 500, "amdo": 500, "kham": 500}
    per_example = Counter(i for i in idx if LABELS[i] == "kham")
    assert len(per_example) == 30 and set(per_example.values()) <= {16, 17}  # 500 = 30*16 + 20: even repeats
    utsang = Counter(i for i in idx if LABELS[i] == "utsang")
    assert max(utsang.values()) == 1 and len(utsang) == 500  # down-sampled: no repeats
    # default num_samples: all included examples, split evenly (780 // 3 = 260 each)
    assert counts(DialectSampler(LABELS, mode="balanced")) == {"utsang": 260, "amdo": 260, "kham": 260}
    # 1501 is not divisible by 3: the remainder is dropped, never silently given to one dialect
    assert len(DialectSampler(LABELS, num_samples=1501).epoch_indices(0)) == 1500


def test_include_subsets_and_fixed_subset():
    one = DialectSampler(LABELS, mode="natural", include="amdo")
    assert counts(one) == {"amdo": 150} and len(set(one.epoch_indices(0))) == 150
    two = DialectSampler(LABELS, mode="balanced", include=["amdo", "kham"], num_samples=100)
    assert counts(two) == {"amdo": 50, "kham": 50}
    with pytest.raises(ValueError, match=r"\['lhasa'\] have no examples"):
        DialectSampler(LABELS, include=["lhasa"])
    small = DialectSampler(LABELS, mode="natural", num_samples=100, seed=3)
    assert len(set(small.epoch_indices(0))) == 100 and set(small.epoch_indices(0)) != set(small.epoch_indices(1))
    fixed = DialectSampler(LABELS, mode="natural", num_samples=100, seed=3, fixed_subset=True)
    e0, e1 = fixed.epoch_indices(0), fixed.epoch_indices(1)
    assert set(e0) == set(e1) and e0 != e1  # same 100 examples, new order


@pytest.mark.parametrize("mode, T", [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)])
def test_weighted_shares_follow_n_pow_inverse_T(mode, T):
    s = DialectSampler(LABELS, mode=mode, temperature=T, num_samples=20000)
    n = {"utsang": 600, "amdo": 150, "kham": 30}
    z = sum(c ** (1 / T) for c in n.values())
    want = {d: c ** (1 / T) / z for d, c in n.items()}
    got = counts(s)
    assert sum(got.values()) == 20000
    for d in n:
        assert got[d] / 20000 == pytest.approx(want[d], abs=1e-3)
        assert s.probabilities()[d] == pytest.approx(want[d], abs=1e-3)
    if T == 5.0:  # a flatter distribution than the natural one
        assert got["kham"] / 20000 > 2 * 30 / 780


def test_deterministic_per_seed_and_epoch():
    a = DialectSampler(LABELS, mode="temperature", temperature=3, seed=7)
    b = DialectSampler(LABELS, mode="temperature", temperature=3, seed=7)
    assert a.epoch_indices(0) == b.epoch_indices(0)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) != DialectSampler(LABELS, mode="temperature", temperature=3, seed=8).epoch_indices(0)
    a.set_epoch(4)
    assert list(a) == b.epoch_indices(4)


def test_resume_mid_epoch_yields_exactly_the_tail():
    s = DialectSampler(LABELS, mode="balanced", num_samples=900, seed=1)
    full = s.epoch_indices(2)
    s.set_epoch(2, start=337)
    assert list(s) == full[337:] and len(s) == 900 - 337
    state = s.state_dict()
    assert state["epoch"] == 2 and state["start"] == 337 and state["seed"] == 1
    fresh = DialectSampler(LABELS, mode="balanced", num_samples=900, seed=1)
    fresh.load_state_dict(state)
    assert list(fresh) == full[337:]
    with pytest.raises(ValueError, match="does not match"):
        DialectSampler(LABELS, mode="balanced", num_samples=600, seed=1).load_state_dict(state)


def test_two_ranks_disjoint_and_cover_the_epoch_also_after_resume():
    full = DialectSampler(LABELS, mode="balanced", num_samples=901, seed=2).epoch_indices(0)  # 900 positions
    for start in (0, 451):  # 451: odd tail length -> one pad position
        shares = []
        for r in range(2):
            s = DialectSampler(LABELS, mode="balanced", num_samples=901, seed=2, rank=r, world_size=2)
            s.set_epoch(0, start)
            shares.append(list(s))
            assert len(s) == len(shares[-1])
        tail = full[start:]
        assert len(shares[0]) == len(shares[1]) == -(-len(tail) // 2)
        positions = list(range(len(tail))) + list(range(-len(tail) % 2))  # padding repeats the first
        assert sorted(shares[0] + shares[1]) == sorted(tail[p] for p in positions)
        assert shares[0] == tail[0::2] and shares[1] == (tail + tail[:len(tail) % 2])[1::2]


def test_length_grouping_sorts_chunks_and_keeps_determinism():
    lengths = [float((i * 37) % 101) for i in range(len(LABELS))]
    s = DialectSampler(LABELS, mode="natural", seed=5, lengths=lengths, group_size=64)
    plain = DialectSampler(LABELS, mode="natural", seed=5).epoch_indices(0)
    idx = s.epoch_indices(0)
    assert sorted(idx) == sorted(plain)  # same examples, only reordered inside chunks
    for c in range(0, len(idx), 64):
        chunk = [lengths[i] for i in idx[c:c + 64]]
        assert chunk == sorted(chunk, reverse=True)
        assert sorted(idx[c:c + 64]) == sorted(plain[c:c + 64])
    assert idx == DialectSampler(LABELS, mode="natural", seed=5, lengths=lengths, group_size=64).epoch_indices(0)
