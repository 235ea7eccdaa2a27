"""LowRankAdapter: a sequential bottleneck whose down/up matrices are rank-r products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_bar import check_refused
from torch import nn

import deltahooks as dh

# the bar (identity, training, files, detach, merge refused, checkpointing, compile) runs for
# LowRankAdapter's rows in tests/method_table.py

ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)).eval()


def expected(y, state, prefix, act):
    t = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    down = t["lowrank_down_u"] @ t["lowrank_down_v"].T
    up = t["lowrank_up_u"] @ t["lowrank_up_v"].T
    return y + act(y @ down.T + t["lowrank_down_bias"]) @ up.T + t["lowrank_up_bias"]


@pytest.mark.parametrize("activation", list(ACTS))
def test_output_matches_the_formula(activation):
    model, x = make_model(), torch.randn(4, 6)
    spec = dh.LowRankAdapter(targets=["0"], reduction_factor=4, rank=2, activation=activation)
    delta = dh.attach(model, spec)
    state = delta.state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes == {
        "0.lowrank_down_u": (4, 2),  # bottleneck 16 // 4 = 4, rank 2
        "0.lowrank_down_v": (16, 2),
        "0.lowrank_down_bias": (4,),
        "0.lowrank_up_u": (16, 2),
        "0.lowrank_up_v": (4, 2),
        "0.lowrank_up_bias": (16,),
    }
    assert not state["0.lowrank_up_u"].any()  # up = 0: the identity at attach
    with torch.no_grad():
        torch.nn.init.normal_(model[0].dh__default__lowrank_up_u)
        state = delta.state_dict()
        with delta.disabled():
            y = model[0](x)
        torch.testing.assert_close(model[0](x), expected(y, state, "0.", ACTS[activation]))


def test_the_bottleneck_is_at_least_one_and_the_down_projection_is_scaled_like_a_linear():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 512))
    delta = dh.attach(model, dh.LowRankAdapter(targets=nn.Linear, rank=3))
    state = delta.state_dict()
    assert state["0.lowrank_down_u"].shape == (1, 3)  # 8 // 32 = 0 -> 1
    assert state["1.lowrank_down_u"].shape == (16, 3)  # 512 // 32
    down = state["1.lowrank_down_u"] @ state["1.lowrank_down_v"].T
    assert 0.5 < down.var().item() * 3 * 512 < 2  # var ~ 1 / (3 fan_in), like nn.Linear


def test_tuple_outputs_change_their_first_element_only():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    model, x = nn.Sequential(Pair()), torch.randn(3, 4)
    delta = dh.attach(model, dh.LowRankAdapter(targets=["0"], reduction_factor=2, hidden_size=4))
    torch.nn.init.normal_(model[0].dh__default__lowrank_up_u)
    first, second = model(x)
    torch.testing.assert_close(first, expected(x * 2, delta.state_dict(), "0.", F.gelu))
    assert second is x


def test_bad_inputs_are_refused_with_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="reduction_factor=0 must be a positive integer"):
        dh.LowRankAdapter(targets=["0"], reduction_factor=0)
    with pytest.raises(dh.SpecError, match=r"rank=1\.5 must be a positive integer"):
        dh.LowRankAdapter(targets=["0"], rank=1.5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Conv2d(8, 8, 1), nn.ReLU())
    check_refused(
        model,
        dh.LowRankAdapter(targets=["1"]),
        dh.UnsupportedModuleError,
        r"'1' \(Conv2d\) works on channels first",
    )
    check_refused(
        model,
        dh.LowRankAdapter(targets=["2"]),
        dh.SpecError,
        r"hidden width of '2' \(ReLU\).*pass hidden_size=",
    )
    check_refused(
        model,
        dh.LowRankAdapter(targets=["0"], hidden_size=6),
        dh.SpecError,
        "output is 8 wide",
    )
