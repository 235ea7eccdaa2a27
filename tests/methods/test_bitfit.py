"""BitFit: a trained bias on each target's output channels, merged into the layer's own bias."""

from __future__ import annotations

import pytest
import torch
from method_bar import (
    check_refused,
    perturb,
)
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import bitfit_net as make_net  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# BitFit's rows in tests/method_table.py


def test_output_is_base_plus_delta_along_the_channels():
    torch.manual_seed(0)
    model, inputs = make_net()
    model.eval()
    delta = dh.attach(model, dh.BitFit(targets=["embed", "conv", "norm", "proj", "ln", "head"]))
    perturb(delta)
    state = delta.state_dict()
    x = inputs["ids"]
    with torch.no_grad(), delta.disabled():
        h = model.embed(x) + state["embed.bitfit_bias"]
        h = model.conv(h.transpose(1, 2)) + state["conv.bitfit_bias"][:, None]
        h = model.norm(h) + state["norm.bitfit_bias"][:, None]
        h = model.proj(h.transpose(1, 2)) + state["proj.bitfit_bias"]
        h = model.ln(h) + state["ln.bitfit_bias"]
        want = model.head(h) + state["head.bitfit_bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize(
    "layer, x, dim",
    [
        (nn.Conv2d(3, 4, 3), torch.randn(3, 6, 6), 0),  # unbatched (C, H, W)
        (nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6), 1),
        (nn.Conv1d(3, 4, 1), torch.randn(3, 5), 0),
        (nn.BatchNorm2d(4), torch.randn(2, 4, 3, 3), 1),
        (nn.GroupNorm(2, 4), torch.randn(2, 4, 5), 1),
        (nn.InstanceNorm1d(4, affine=True), torch.randn(4, 5), 0),  # unbatched (C, L)
        (nn.InstanceNorm1d(4, affine=True), torch.randn(2, 4, 5), 1),
    ],
)
def test_channels_first_layers_get_one_bias_per_channel(layer, x, dim):
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval()
    delta = dh.attach(model, dh.BitFit(targets=["0"]))
    perturb(delta)
    shape = [1] * x.dim()
    shape[dim] = -1
    bias = delta.state_dict()["0.bitfit_bias"].view(shape)
    with torch.no_grad():
        with delta.disabled():
            base = model(x)
        torch.testing.assert_close(model(x), base + bias)
        delta.merge()
        torch.testing.assert_close(model(x), base + bias)


def test_default_targets_are_the_layers_that_have_a_bias():
    torch.manual_seed(0)
    model, _ = make_net()
    delta = dh.attach(model, dh.BitFit())
    assert delta.paths == ["conv", "norm", "ln", "head"]  # not the embedding, not proj
    assert not hasattr(model.proj, "bias") or model.proj.bias is None


def test_a_new_bias_adds_no_attribute_to_the_base_module():
    torch.manual_seed(0)
    model, _ = make_net()
    before = snapshot(model)
    delta = dh.attach(model, dh.BitFit(targets=["proj"]))
    assert model.proj.bias is None
    assert [n for n, _ in model.proj.named_parameters()] == ["weight", "dh__default__bitfit_bias"]
    delta.detach()
    assert_restored(model, before)


def test_gpt2_conv1d_output_and_merge():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6)).eval()
    x = torch.randn(2, 3, 6)
    delta = dh.attach(model, dh.BitFit())
    perturb(delta)
    with torch.no_grad():
        with delta.disabled():
            want = model(x) + delta.state_dict()["0.bitfit_bias"]
        torch.testing.assert_close(model(x), want)
        delta.merge()
        torch.testing.assert_close(model(x), want)


def test_an_adapter_on_the_same_layer_sees_the_bias_merged_or_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    adapter = dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2, init="random"), name="a")
    bitfit = dh.attach(model, dh.BitFit(targets=["0"]), name="b")
    perturb(bitfit)
    x = torch.randn(3, 4)
    with torch.no_grad():
        hooked = model(x)
        bitfit.merge()
        torch.testing.assert_close(model(x), hooked)
        bitfit.unmerge()
    adapter.detach()
    bitfit.detach()


def test_bad_inputs_leave_the_model_unchanged():
    torch.manual_seed(0)
    llama, _ = MODELS["llama"]()
    check_refused(llama, dh.BitFit(), dh.TargetError, "targets='all-linear'")
    model, _ = make_net()
    model.add_module("act", nn.ReLU())
    check_refused(model, dh.BitFit(targets=["head", "act"]), dh.UnsupportedModuleError, "ReLU")
    model.add_module("flat", nn.LayerNorm(5, elementwise_affine=False))
    check_refused(model, dh.BitFit(targets=["flat"]), dh.UnsupportedModuleError, "LayerNorm")
    with pytest.raises(dh.SpecError, match="targets is empty"):
        dh.BitFit(targets=[])


def test_bias_parameters_of_modules_that_are_not_layers_are_in_the_default():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    delta = dh.attach(model, dh.BitFit())
    assert "self_attn.in_proj_bias.bitfit_bias" in delta.state_dict()
    assert sum(p.numel() for p in delta.parameters()) == biases


def test_a_bias_parameter_is_addressable_by_its_path():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()
    delta = dh.attach(model, dh.BitFit(targets=["self_attn.in_proj_bias"]))
    assert delta.paths == ["self_attn.in_proj_bias"]
    assert list(delta.state_dict()) == ["self_attn.in_proj_bias.bitfit_bias"]
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        base = model(x)
        delta.state_dict(keep_vars=True)["self_attn.in_proj_bias.bitfit_bias"].fill_(0.5)
        assert not torch.allclose(model(x), base, atol=1e-4)


def test_a_parameter_that_is_no_bias_is_refused():
    model = nn.TransformerEncoderLayer(8, 2, 16)
    check_refused(
        model, dh.BitFit(targets=["self_attn.in_proj_weight"]), dh.UnsupportedModuleError, "bias"
    )


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A model's own norm that keeps channels first, as ConvNeXt's does: (N, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirstScale(nn.Module):
    """A model's own bias-free norm with its channels first: nowhere for a bias to go."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.weight[:, None, None]


ChannelsFirstScale.__name__ = "ChannelsFirstRMSNorm"  # a norm by name, as models spell them


def test_a_models_own_norm_trains_its_bias_where_it_adds_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ChannelsFirstLayerNorm(4)).eval()
    x = torch.randn(2, 3, 5, 6)  # (N, C, H, W): the last dim is not the channels
    before = snapshot(model)
    delta = dh.attach(model, dh.BitFit(targets=["1"]))
    assert "via bias" in dh.summary(model)
    perturb(delta)
    bias = delta.state_dict()["1.bitfit_bias"].view(1, -1, 1, 1)
    with torch.no_grad():
        with delta.disabled():
            base = model(x)
        torch.testing.assert_close(model(x), base + bias)
        delta.merge()
        torch.testing.assert_close(model(x), base + bias)
        delta.unmerge()
    delta.detach()
    assert_restored(model, before)


def test_a_bias_free_norm_with_channels_elsewhere_is_refused_at_its_first_call():
    model = nn.Sequential(ChannelsFirstScale(4)).eval()
    before = snapshot(model)
    delta = dh.attach(model, dh.BitFit(targets=["0"]))
    with pytest.raises(dh.UnsupportedModuleError, match=r"shape \(2, 4, 5, 6\).*elsewhere"):
        model(torch.randn(2, 4, 5, 6))
    delta.detach()
    assert_restored(model, before)
