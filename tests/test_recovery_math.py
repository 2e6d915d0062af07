import math

import pytest
import torch

from ds_checkfree.recovery.rules import (
    RecoveryAction,
    UnrecoverableFailure,
    combine,
    gradient_weights,
    plan_recovery,
    weighted_average,
)

A = RecoveryAction


# ---------------------------------------------------------------- plan_recovery: checkfree
@pytest.mark.parametrize("method,sources", [
    ("weighted_average", (1, 3)), ("mean", (1, 3)), ("copy_prev", (1,)), ("copy_next", (3,)), ("random", ()),
])
def test_checkfree_intermediate(method, sources):
    assert plan_recovery([2], 5, "checkfree", method) == [A(2, method, sources)]


def test_checkfree_two_non_adjacent_sorted():
    assert plan_recovery({3, 1}, 5, "checkfree") == [
        A(1, "weighted_average", (0, 2)), A(3, "weighted_average", (2, 4))]


def test_no_loss_no_action():
    assert plan_recovery([], 4, "checkfree") == []
    assert plan_recovery([], 4, "off") == []


def test_duplicates_collapse():
    assert plan_recovery([1, 1], 4, "checkfree") == [A(1, "weighted_average", (0, 2))]


@pytest.mark.parametrize("stage,word", [(0, "first"), (3, "last")])
def test_checkfree_edge_unrecoverable(stage, word):
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([stage], 4, "checkfree")
    msg = str(e.value)
    assert f"stage {stage} is the {word} stage" in msg
    assert "checkfree_plus" in msg and "fallback_checkpoint_dir" in msg


def test_checkfree_edge_with_checkpoint():
    assert plan_recovery([0], 4, "checkfree", has_checkpoint=True) == [A(0, "checkpoint", ())]


def test_adjacent_unrecoverable_message():
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([1, 2], 4, "checkfree")
    msg = str(e.value)
    assert "[1, 2]" in msg
    assert "stages 1 and 2 are adjacent: stage 1's neighbour 2 is lost too" in msg
    assert "stage 2's neighbour 1 is lost too" in msg
    assert "fallback_checkpoint_dir" in msg


def test_rollback_is_all_or_nothing():
    # stage 4 alone would be recoverable, but 1 and 2 are not: everything rolls back
    assert plan_recovery([1, 2, 4], 6, "checkfree", has_checkpoint=True) == [
        A(1, "checkpoint", ()), A(2, "checkpoint", ()), A(4, "checkpoint", ())]
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([1, 2, 4], 6, "checkfree")
    msg = str(e.value)
    assert "[1, 2, 4]" in msg and "stage 4 could be rebuilt" in msg


def test_mixed_edge_and_intermediate():
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([0, 2], 5, "checkfree")
    msg = str(e.value)
    assert "stage 0 is the first stage" in msg and "[0, 2]" in msg


def test_three_adjacent_middle_names_both_neighbours():
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([1, 2, 3], 5, "checkfree")
    assert "stage 2's neighbours 1 and 3 are lost too" in str(e.value)


def test_random_still_needs_live_neighbours():
    with pytest.raises(UnrecoverableFailure):
        plan_recovery([1, 2], 5, "checkfree", "random")


# ---------------------------------------------------------------- plan_recovery: checkfree_plus
def test_checkfree_plus_edges_and_pairs():
    s = 6
    assert plan_recovery([0], s, "checkfree_plus") == [A(0, "copy", (1,))]
    assert plan_recovery([1], s, "checkfree_plus") == [A(1, "copy", (0,))]
    assert plan_recovery([5], s, "checkfree_plus") == [A(5, "copy", (4,))]
    assert plan_recovery([4], s, "checkfree_plus") == [A(4, "copy", (5,))]
    assert plan_recovery([2], s, "checkfree_plus", "copy_next") == [A(2, "copy_next", (3,))]
    assert plan_recovery([0, 5], s, "checkfree_plus") == [A(0, "copy", (1,)), A(5, "copy", (4,))]
    assert plan_recovery([0, 2, 4], s, "checkfree_plus") == [
        A(0, "copy", (1,)), A(2, "weighted_average", (1, 3)), A(4, "copy", (5,))]


def test_checkfree_plus_four_stages():
    assert plan_recovery([0, 3], 4, "checkfree_plus") == [A(0, "copy", (1,)), A(3, "copy", (2,))]
    assert plan_recovery([1, 2], 4, "checkfree_plus") == [A(1, "copy", (0,)), A(2, "copy", (3,))]


@pytest.mark.parametrize("pair", [(0, 1), (4, 5)])
def test_checkfree_plus_swap_pair_lost(pair):
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery(pair, 6, "checkfree_plus")
    msg = str(e.value)
    assert f"stages {pair[0]} and {pair[1]} are a CheckFree+ swap pair" in msg
    assert str(list(pair)) in msg
    assert plan_recovery(pair, 6, "checkfree_plus", has_checkpoint=True) == [
        A(pair[0], "checkpoint", ()), A(pair[1], "checkpoint", ())]


def test_checkfree_plus_pair_member_and_its_other_neighbour():
    # 1 is copied from 0 but 2 needs 1 alive: unrecoverable
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([1, 2], 6, "checkfree_plus")
    assert "stage 2's neighbour 1 is lost too" in str(e.value)


def test_checkfree_plus_needs_four_stages():
    with pytest.raises(ValueError, match="at least 4"):
        plan_recovery([0], 3, "checkfree_plus")


# ---------------------------------------------------------------- plan_recovery: off / validation
def test_mode_off():
    assert plan_recovery([2], 4, "off", has_checkpoint=True) == [A(2, "checkpoint", ())]
    with pytest.raises(UnrecoverableFailure) as e:
        plan_recovery([2], 4, "off")
    assert "stage 2" in str(e.value) and "'off'" in str(e.value)


@pytest.mark.parametrize("kwargs", [
    dict(lost=[4], num_stages=4, mode="checkfree"),
    dict(lost=[-1], num_stages=4, mode="checkfree"),
    dict(lost=[1], num_stages=4, mode="checkfree++"),
    dict(lost=[1], num_stages=4, mode="checkfree", method="median"),
    dict(lost=[1], num_stages=4, mode="checkfree", method="checkpoint"),
])
def test_plan_validation(kwargs):
    with pytest.raises(ValueError):
        plan_recovery(**kwargs)


# ---------------------------------------------------------------- gradient_weights
def test_gradient_weights():
    assert gradient_weights(2.0, 3.0) == (2.0 + 1e-4, 3.0 + 1e-4)
    assert gradient_weights(0.0, 0.0, eps=0.5) == (0.5, 0.5)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            gradient_weights(bad, 1.0)
        with pytest.raises(ValueError):
            gradient_weights(1.0, bad)


# ---------------------------------------------------------------- weighted_average
def _sd(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g, dtype=dtype), "b": torch.randn(4, generator=g, dtype=dtype)}


def test_weighted_average_hand_computation():
    prev = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    nxt = {"x": torch.tensor([3.0, 10.0], dtype=torch.float64)}
    # (a*next + b*prev)/(a+b), b=1 (prev), a=3 (next)
    out = weighted_average(prev, nxt, prev_weight=1.0, next_weight=3.0)
    expected = torch.tensor([(3 * 3 + 1 * 1) / 4, (3 * 10 + 1 * 2) / 4], dtype=torch.float64)
    assert torch.allclose(out["x"], expected, atol=1e-12, rtol=0)

    p, n = _sd(0), _sd(1)
    b, a = 0.7, 2.3
    out = weighted_average(p, n, b, a)
    for k in p:
        manual = torch.empty_like(p[k])
        flat_p, flat_n, flat_m = p[k].reshape(-1), n[k].reshape(-1), manual.reshape(-1)
        for i in range(flat_p.numel()):
            flat_m[i] = (a * flat_n[i].item() + b * flat_p[i].item()) / (a + b)
        assert (out[k] - manual).abs().max().item() < 1e-12
    assert out.keys() == p.keys()


def test_weighted_average_keeps_dtype_and_does_not_alias():
    p, n = _sd(0, torch.bfloat16), _sd(1, torch.bfloat16)
    out = weighted_average(p, n, 1.0, 1.0)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    ref = ((p["w"].double() + n["w"].double()) / 2).to(torch.bfloat16)
    assert torch.equal(out["w"], ref)
    p32 = _sd(2, torch.float32)
    out = weighted_average(p32, p32, 1.0, 0.0)
    assert torch.equal(out["w"], p32["w"]) and out["w"].data_ptr() != p32["w"].data_ptr()


def test_weighted_average_shape_mismatch():
    p = {"a": torch.zeros(2), "w": torch.zeros(3, 4)}
    n = {"a": torch.zeros(2), "w": torch.zeros(4, 3)}
    with pytest.raises(ValueError) as e:
        weighted_average(p, n, 1.0, 1.0)
    msg = str(e.value)
    assert "'w'" in msg and "(3, 4)" in msg and "(4, 3)" in msg


def test_weighted_average_key_mismatch():
    p = {"a": torch.zeros(2), "w": torch.zeros(3)}
    n = {"a": torch.zeros(2), "v": torch.zeros(3)}
    with pytest.raises(ValueError) as e:
        weighted_average(p, n, 1.0, 1.0)
    assert "'w'" in str(e.value) and "(3,)" in str(e.value)
    with pytest.raises(ValueError, match="'v'"):
        weighted_average({"a": torch.zeros(2)}, {"a": torch.zeros(2), "v": torch.zeros(3)}, 1.0, 1.0)


def test_weighted_average_bad_weights():
    p = _sd(0)
    for pw, nw in ((0.0, 0.0), (-1.0, 1.0), (math.nan, 1.0)):
        with pytest.raises(ValueError):
            weighted_average(p, p, pw, nw)


def test_weighted_average_integer_buffers():
    p = {"idx": torch.tensor([1, 2, 3])}
    assert torch.equal(weighted_average(p, {"idx": torch.tensor([1, 2, 3])}, 1.0, 2.0)["idx"], p["idx"])
    with pytest.raises(ValueError, match="idx"):
        weighted_average(p, {"idx": torch.tensor([1, 2, 4])}, 1.0, 2.0)


# ---------------------------------------------------------------- combine
def test_combine_weighted_average():
    p, n = _sd(0), _sd(1)
    out, w = combine("weighted_average", [p, n], [2.0, 6.0], 1e-4, template=p, generator=None)
    b, a = 2.0 + 1e-4, 6.0 + 1e-4
    assert w == [b, a]
    for k in p:
        assert torch.allclose(out[k], (a * n[k] + b * p[k]) / (a + b), atol=1e-12, rtol=0)


def test_combine_mean_and_copies():
    p, n = _sd(0), _sd(1)
    out, w = combine("mean", [p, n], [], 1e-4, template=p, generator=None)
    assert w == [0.5, 0.5] and torch.allclose(out["w"], (p["w"] + n["w"]) / 2, atol=1e-12)
    for method in ("copy_prev", "copy_next", "copy"):
        out, w = combine(method, [n], [], 1e-4, template=p, generator=None)
        assert w == [1.0]
        assert all(torch.equal(out[k], n[k]) for k in n)
        assert out["w"].data_ptr() != n["w"].data_ptr()


def test_combine_random():
    template = {
        "layers.0.attn.weight": torch.zeros(64, 32),
        "layers.0.input_layernorm.weight": torch.zeros(32),
        "layers.0.mlp.bias": torch.full((32,), 7.0),
        "steps": torch.tensor([5]),
    }
    out, w = combine("random", [], [], 1e-4, template=template, generator=torch.Generator().manual_seed(0))
    assert w == []
    assert out["layers.0.attn.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert out["layers.0.attn.weight"].mean().abs().item() < 0.002
    assert torch.equal(out["layers.0.input_layernorm.weight"], torch.ones(32))
    assert torch.equal(out["layers.0.mlp.bias"], torch.zeros(32))
    assert torch.equal(out["steps"], torch.tensor([5]))
    again, _ = combine("random", [], [], 1e-4, template=template, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["layers.0.attn.weight"], out["layers.0.attn.weight"])
    other, _ = combine("random", [], [], 1e-4, template=template, generator=torch.Generator().manual_seed(1),
                       init_std=0.5)
    assert other["layers.0.attn.weight"].std().item() == pytest.approx(0.5, rel=0.1)


def test_combine_validation():
    p, n = _sd(0), _sd(1)
    with pytest.raises(ValueError):
        combine("weighted_average", [p], [1.0], 1e-4, template=p, generator=None)
    with pytest.raises(ValueError):
        combine("weighted_average", [p, n], [1.0], 1e-4, template=p, generator=None)
    with pytest.raises(ValueError):
        combine("checkpoint", [], [], 1e-4, template=p, generator=None)
    with pytest.raises(ValueError):
        combine("copy", [p, n], [], 1e-4, template=p, generator=None)
    bad = {"w": torch.zeros(4, 3), "b": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="'w'"):
        combine("copy", [bad], [], 1e-4, template=p, generator=None)
