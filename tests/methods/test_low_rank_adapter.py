"""LowRankAdapter: a sequential bottleneck whose down/up matrices are rank-r products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_checks import (
    check_checkpointing,
    check_compile,
    check_lifecycle,
    check_refused,
    plain,
)
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# whole decoder layers / blocks (T5's return tuples), BERT ``output`` blocks and the
# Houlsby placement ``output.dense``, and plain Linear layers
TARGETS = {
    "gpt2": [r"re:.*\.h\.\d+"],
    "llama": [r"re:.*layers\.\d+", "down_proj"],
    "bert": ["output.dense", "layer.1.output"],
    "t5": [r"re:.*block\.\d+"],
    "vit": ["mlp", "o_proj"],
    "opt": [r"re:.*layers\.\d+", "fc2"],
}
ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def spec(name: str) -> dh.LowRankAdapter:
    return dh.LowRankAdapter(targets=TARGETS[name], reduction_factor=8, rank=2)


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


@pytest.mark.parametrize("name", list(MODELS))
def test_lifecycle_on_tiny_transformers(name, tmp_path):
    check_lifecycle(MODELS[name], spec(name), tmp_path)


def test_lifecycle_on_plain_torch(tmp_path):
    spec = dh.LowRankAdapter(targets=["0", "1", "2"], reduction_factor=2)
    check_lifecycle(plain(make_model, 4, 6), spec, tmp_path)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(name, reentrant):
    check_checkpointing(MODELS[name], spec(name), reentrant)


def test_compiles_without_graph_breaks():
    check_compile(MODELS["llama"], spec("llama"))


def test_bad_inputs_are_refused_with_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="reduction_factor=0 must be a positive integer"):
        dh.LowRankAdapter(targets=["0"], reduction_factor=0)
    with pytest.raises(dh.SpecError, match=r"rank=1\.5 must be a positive integer"):
        dh.LowRankAdapter(targets=["0"], rank=1.5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Conv2d(8, 8, 1), nn.ReLU())
    check_refused(
        model,
        lambda: dh.attach(model, dh.LowRankAdapter(targets=["1"])),
        dh.UnsupportedModuleError,
        r"'1' \(Conv2d\) works on channels first",
    )
    check_refused(
        model,
        lambda: dh.attach(model, dh.LowRankAdapter(targets=["2"])),
        dh.SpecError,
        r"hidden width of '2' \(ReLU\).*pass hidden_size=",
    )
    check_refused(
        model,
        lambda: dh.attach(model, dh.LowRankAdapter(targets=["0"], hidden_size=6)),
        dh.SpecError,
        "output is 8 wide",
    )
