"""Rank strategies: mixed specs, SVD truncation for high-rank warm-up, AdaLoRA-style dynamic allocation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import (AdapterSpec, DynamicRankAllocator, HighRankWarmup, LoRALinear, apply_rank_strategy, lora_modules,
                  mark_only_lora_trainable, parse_rank_spec, truncate_adapter)
from test_lora_layers import TOKENS, logits, mel_batch, randomize_lora, tiny


def test_parse_rank_spec_builds_prefix_patterns():
    model = tiny()
    apply_rank_strategy(model, "mixed", r=4, alpha=8, targets="attn",
                        spec="encoder=8, decoder=32, decoder.blocks.1-1.cross_attn=0")
    ranks = {n: m.specs["default"].r for n, m in lora_modules(model).items()}
    assert ranks["encoder.blocks.1.attn.key"] == 8 and ranks["decoder.blocks.0.cross_attn.out"] == 32
    assert ranks["decoder.blocks.1.attn.value"] == 32
    assert not any(n.startswith("decoder.blocks.1.cross_attn") for n in ranks)
    assert len(ranks) == 24 - 4
    assert parse_rank_spec("decoder.blocks.0-2=4") == {r"^decoder\.blocks\.(0|1|2)(\.|$)": 4}
    for bad in ("encoder", "encoder=x", "decoder.blocks.3-1=4", ""):
        with pytest.raises(ValueError, match="rank spec"):
            parse_rank_spec(bad)


def test_apply_rank_strategy_rejects_unknown_names_and_args():
    with pytest.raises(ValueError, match="unknown rank strategy 'adalora'"):
        apply_rank_strategy(tiny(), "adalora")
    with pytest.raises(TypeError, match="warmup_r"):
        apply_rank_strategy(tiny(), "fixed", warmup_r=64)
    with pytest.raises(ValueError, match="switch_step"):
        apply_rank_strategy(tiny(), "warmup", r=4)
    assert apply_rank_strategy(tiny(), "fixed", r=256, alpha=512) is None


def test_svd_truncation_keeps_exactly_the_top_r_part():
    torch.manual_seed(0)
    m = LoRALinear.from_linear(nn.Linear(40, 24))
    m.add_adapter("a", AdapterSpec(r=16, alpha=32))
    m.set_active("a")
    with torch.no_grad():
        m.lora_B["a"].normal_()
    old_A = m.lora_A["a"]
    BA = (m.lora_B["a"] @ m.lora_A["a"]).detach().double()
    U, S, Vh = torch.linalg.svd(BA, full_matrices=False)
    top4 = 2.0 * (U[:, :4] * S[:4]) @ Vh[:4]  # old scale 32/16 times the rank-4 truncation
    truncate_adapter(m, "a", 4)
    assert m.specs["a"].r == 4 and m.specs["a"].scale == 8.0
    assert m.lora_A["a"].shape == (4, 40) and m.lora_B["a"].shape == (24, 4)
    assert m.lora_A["a"] is not old_A  # new tensors: the optimizer must be rebuilt
    torch.testing.assert_close(m.delta_weight("a").double(), top4, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(top4, 2.0 * BA, atol=1e-2)  # the truncation did drop something
    with pytest.raises(ValueError, match="1..4"):
        truncate_adapter(m, "a", 8)


def test_high_rank_warmup_switches_once_and_asks_for_a_new_optimizer():
    model = tiny()
    hook = apply_rank_strategy(model, "warmup", r=4, alpha=8, warmup_r=16, switch_step=3)
    assert isinstance(hook, HighRankWarmup)
    assert set(hook.current_ranks().values()) == {16}
    randomize_lora(model, std=0.05)
    q = model.encoder.blocks[0].attn.query
    assert [hook.update_and_allocate(s) for s in range(3)] == [False] * 3
    before = {n: m.delta_weight("default") for n, m in lora_modules(model).items()}
    assert hook.update_and_allocate(3) is True
    assert hook.update_and_allocate(4) is False
    assert set(hook.current_ranks().values()) == {4}
    for n, m in lora_modules(model).items():
        U, S, Vh = torch.linalg.svd(before[n].double(), full_matrices=False)
        torch.testing.assert_close(m.delta_weight("default").double(), (U[:, :4] * S[:4]) @ Vh[:4],
                                   rtol=1e-5, atol=1e-6)
    mark_only_lora_trainable(model)
    out = model(mel_batch(), TOKENS)  # still runs, and trains, at the new rank
    out.sum().backward()
    assert q.lora_A["default"].grad.shape == (4, 64)
    # resume: a fresh warm-up hook told it already truncated reshapes the adapter before the state is loaded
    resumed = tiny()
    hook2 = apply_rank_strategy(resumed, "warmup", r=4, alpha=8, warmup_r=16, switch_step=3)
    hook2.load_state_dict(hook.state_dict())
    resumed.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(resumed), logits(model))


def _train_with_allocator(model, hook, steps):
    mark_only_lora_trainable(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mel, inp, tgt = mel_batch(), TOKENS[:, :-1], TOKENS[:, 1:]
    history = []
    for step in range(steps):
        out = model(mel, inp)
        loss = F.cross_entropy(out.flatten(0, 1), tgt.flatten()) + hook.regularizer()
        loss.backward()
        opt.step()
        assert hook.update_and_allocate(step) is False  # masking never replaces tensors
        opt.zero_grad(set_to_none=True)
        active = sum(hook.current_ranks().values())
        nonzero = sum(int(torch.count_nonzero(m.lora_E["default"])) for m in lora_modules(model).values())
        history.append((step, hook.budget(step), active, nonzero))
    return history


def test_dynamic_allocator_honours_the_budget_every_step():
    model = tiny()
    hook = apply_rank_strategy(model, "dynamic", r=2, alpha=4, targets="qv", init_r=6, total_steps=16,
                               warmup_steps=2, final_steps=4)
    assert isinstance(hook, DynamicRankAllocator)
    assert hook.init_total == 12 * 6 and hook.target_total == 12 * 2
    budgets = [hook.budget(s) for s in range(16)]
    assert budgets[:3] == [72] * 3 and budgets[-4:] == [24] * 4
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and 24 < budgets[6] < 72
    # cubic: halfway through the shrinking phase 1/8 of the excess budget is left
    assert hook.budget(7) == int(24 + 48 * (1 - 5 / 10) ** 3)

    history = _train_with_allocator(model, hook, steps=16)
    for step, budget, active, nonzero in history:
        assert active <= budget and nonzero <= budget, (step, budget, active, nonzero)
    assert history[-1][2] == 24  # ends at the target total
    ranks = hook.current_ranks()
    assert set(ranks) == set(lora_modules(model)) and all(0 <= r <= 6 for r in ranks.values())
    assert len(set(ranks.values())) > 1  # the budget was reallocated, not cut evenly
    reg = hook.orth_reg()
    assert reg.ndim == 0 and reg.item() > 0 and reg.requires_grad


def test_dynamic_allocator_complains_when_gradients_are_gone():
    model = tiny()
    hook = apply_rank_strategy(model, "dynamic", r=2, alpha=4, init_r=4, total_steps=10, warmup_steps=1)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        hook.update_and_allocate(0)
    with pytest.raises(ValueError, match="kind 'svd'"):
        model2 = tiny()
        apply_rank_strategy(model2, "fixed", r=2)
        DynamicRankAllocator(model2, "default", target_total=4, total_steps=10)
