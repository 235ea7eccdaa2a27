"""Adapter: a residual bottleneck on a module's output, checked against the formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu"])
def test_output_matches_the_formula(activation):
    model = make_model()
    x = torch.randn(4, 6)
    spec = dh.Adapter(targets=["1"], bottleneck=3, activation=activation, scale=0.5, init="random")
    delta = dh.attach(model, spec)
    state = delta.state_dict()
    act = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}[activation]
    with torch.no_grad():
        with delta.disabled():
            y = model[1](model[0](x))
        h = act(y @ state["1.adapter_down"].T + state["1.adapter_down_bias"])
        want = model[2](y + 0.5 * (h @ state["1.adapter_up"].T + state["1.adapter_up_bias"]))
        torch.testing.assert_close(model(x), want)


def test_save_and_load_reproduce_outputs(tmp_path):
    model, fresh = make_model(), make_model()
    delta = dh.attach(model, dh.Adapter(targets=["0", "1"], bottleneck=4, init="random"))
    delta.save(tmp_path / "a.safetensors")
    dh.load(fresh, tmp_path / "a.safetensors")
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_outputs_equal(fresh(x), model(x))


def test_merge_is_refused_and_changes_nothing():
    model = make_model()
    delta = dh.attach(
        model, [dh.LoRA(targets=["2"], init="random"), dh.Adapter(targets=["1"], bottleneck=2)]
    )
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="non-linear"):
        delta.merge()
    assert_restored(model, before)
    assert not delta.merged


def test_width_must_be_known_and_tuple_outputs_act_on_their_first_element():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(dh.SpecError, match=r"'0' \(Pair\).*hidden_size"):
        dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2))
    delta = dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2, hidden_size=4, init="random"))
    x = torch.randn(1, 4)
    first, second = model(x)
    down, down_bias, up, up_bias = delta.state_dict().values()
    torch.testing.assert_close(first, x + torch.relu(x @ down.T + down_bias) @ up.T + up_bias)
    assert second is x  # the rest of the tuple passes through untouched


def test_an_output_without_a_tensor_is_refused_by_name():
    class Words(nn.Module):
        def forward(self, x):
            return "not a tensor"

    model = nn.Sequential(Words())
    dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2, hidden_size=4))
    with pytest.raises(dh.UnsupportedModuleError, match="Words returned str"):
        model(torch.randn(1, 4))


@pytest.mark.parametrize("adapter_first", [True, False])
def test_an_adapter_sees_the_layer_with_its_lora_update_in_any_order(adapter_first):
    model = make_model()
    x = torch.randn(4, 6)
    specs = {
        "adapter": dh.Adapter(targets=["0"], bottleneck=3, init="random"),
        "lora": dh.LoRA(targets=["0"], r=2, init="random"),
    }
    order = ["adapter", "lora"] if adapter_first else ["lora", "adapter"]
    deltas = {name: dh.attach(model, specs[name], name=name) for name in order}
    with torch.no_grad():
        hooked = model(x)
        deltas["lora"].merge()  # LoRA folded into the weight: the adapter must see the same
        torch.testing.assert_close(model(x), hooked)
        deltas["lora"].unmerge()
        torch.testing.assert_close(model(x), hooked)


class ChannelsFirstBlock(nn.Module):
    """A convolutional stage that returns (N, C, H, W), as ConvNeXt's do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.proj = nn.Linear(8, 8)  # the width the adapters plan for

    def forward(self, x):
        return self.conv(x) + self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Merging(nn.Module):
    """(N, 4L, C) in, (N, L, 2C) out: a stage that merges tokens, as Swin's does."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.reduce = nn.Linear(32, 16)

    def forward(self, x):
        n, length, c = x.shape
        return self.reduce(self.mix(x).reshape(n, length // 4, 4 * c))


@pytest.mark.parametrize(
    "spec",
    [
        dh.Adapter(targets=["0"], bottleneck=2),
        dh.ParallelAdapter(targets=["0"], bottleneck=2),
        dh.LowRankAdapter(targets=["0"], reduction_factor=4),
        dh.Compacter(targets=["0"], reduction_factor=4),
        dh.ReFT(targets=["0"], rank=2),
    ],
    ids=lambda spec: type(spec).__name__,
)
def test_a_channels_first_output_is_refused_at_the_first_call_by_its_shape(spec):
    model = nn.Sequential(ChannelsFirstBlock()).eval()
    before = snapshot(model)
    delta = dh.attach(model, spec)
    with pytest.raises(dh.UnsupportedModuleError, match=r"\(2, 8, 3, 5\)"):
        model(torch.randn(2, 8, 3, 5))
    delta.detach()
    assert_restored(model, before)


def test_a_parallel_adapter_on_a_module_that_merges_tokens_says_so():
    model = nn.Sequential(Merging()).eval()
    delta = dh.attach(model, dh.ParallelAdapter(targets=["0"], bottleneck=2))
    with pytest.raises(dh.UnsupportedModuleError, match=r"\(2, 12, 8\).*\(2, 3, 16\).*tokens"):
        model(torch.randn(2, 12, 8))
    delta.detach()
