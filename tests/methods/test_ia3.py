"""IA3: vectors scale targets' outputs, or the inputs of feedforward targets, as PEFT's do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from method_bar import (
    check_refused,
    evaluate,
    perturb,
    seeded,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import ia3_net as make_net  # noqa: E402
from method_table import IA3_PLACES  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# IA3's rows in tests/method_table.py

PLACES = {name: IA3_PLACES[name] for name in MODELS}  # PEFT's own targets (ViT: ours)
NET_SPEC = dh.IA3(targets=["embed", "conv", "down", "up", "out"], feedforward=["down", "out"])


def test_the_formulas_per_layer_kind():
    model, inputs = seeded(make_net)
    delta = dh.attach(model, NET_SPEC)
    perturb(delta)
    v = {key.split(".")[0]: t for key, t in delta.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in v.items()} == {
        "embed": (4,),  # output: embedding_dim
        "conv": (6,),  # output channels
        "down": (6,),  # feedforward: input channels
        "up": (8,),
        "out": (8,),  # feedforward: in_features
    }
    with torch.no_grad(), delta.disabled():
        h = model.embed(inputs["ids"]) * v["embed"]
        h = model.conv(h.transpose(1, 2)) * v["conv"][:, None]
        h = model.down(torch.relu(h) * v["down"][:, None])
        h = model.up(h.transpose(1, 2)) * v["up"]
        want = model.out(torch.relu(h) * v["out"])
    torch.testing.assert_close(evaluate(model, inputs), want)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize(
    "x", [torch.randn(2, 4, 5, 5), torch.randn(4, 5, 5)], ids=["N", "unbatched"]
)
def test_grouped_conv2d_scales_channels_and_merges(feedforward, x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).eval()
    delta = dh.attach(model, dh.IA3(targets=["0"], feedforward=["0"] if feedforward else []))
    perturb(delta)
    vector = delta.state_dict()["0.ia3_l"].view(-1, 1, 1)
    with torch.no_grad():
        with delta.disabled():
            want = model(x * vector) if feedforward else model(x) * vector
        torch.testing.assert_close(model(x), want)
        delta.merge()
        torch.testing.assert_close(model(x), want)


def test_gpt2_conv1d_output_and_input_vectors_merge_like_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6), Conv1D(3, 5)).eval()  # (nf, nx): 6 → 5 → 3
    delta = dh.attach(model, dh.IA3(targets=["0", "1"], feedforward="1"))
    perturb(delta)
    out_vector, in_vector = delta.state_dict().values()
    assert out_vector.shape == (5,) and in_vector.shape == (5,)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        with delta.disabled():
            want = model[1](model[0](x) * out_vector * in_vector)
        torch.testing.assert_close(model(x), want)
        delta.merge()
        torch.testing.assert_close(model(x), want)


def test_bias_is_scaled_with_outputs_and_kept_for_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()
    bias = [model[0].bias.clone(), model[1].bias.clone()]
    delta = dh.attach(model, dh.IA3(targets=["0", "1"], feedforward=["1"]))
    perturb(delta)
    vectors = list(delta.state_dict().values())
    delta.merge()
    torch.testing.assert_close(model[0].bias, bias[0] * vectors[0])
    assert torch.equal(model[1].bias, bias[1])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_with_random_vectors(name):
    peft = pytest.importorskip("peft")
    model, inputs = seeded(MODELS[name])
    ours = copy.deepcopy(model)
    targets, feedforward = PLACES[name]
    config = peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
    )
    theirs = peft.get_peft_model(model, config).eval()
    delta = dh.attach(ours, dh.IA3(targets=targets, feedforward=feedforward))
    vectors = {k: v for k, v in theirs.state_dict().items() if "ia3_l" in k}
    assert len(vectors) == len(delta.paths)
    with torch.no_grad():
        for path in delta.paths:
            (key,) = (k for k in vectors if k.endswith(f".{path}.ia3_l.default"))
            ours.get_submodule(path).dh__default__ia3_l.copy_(vectors[key].flatten())
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)
    delta.merge()
    theirs.merge_adapter()
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)
    with torch.no_grad():
        for path in delta.paths:  # the merged weights themselves
            mine = ours.get_submodule(path).weight
            (peft_layer,) = (
                m for n, m in theirs.named_modules() if n.endswith(f".{path}.base_layer")
            )
            assert torch.equal(mine, peft_layer.weight)


def test_input_scaling_in_bfloat16_stays_in_the_layer_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    dh.attach(model, dh.IA3(targets=["0", "1"], feedforward=["1"], init="random"))
    with torch.no_grad():
        assert model(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.float()
        assert model(torch.randn(3, 4)).dtype == torch.bfloat16


def test_random_init_changes_outputs_and_default_does_not():
    model, inputs = seeded(make_net)
    base = evaluate(model, inputs)
    delta = dh.attach(model, dh.IA3(targets=["up"], init="random"))
    assert not torch.equal(evaluate(model, inputs), base)
    delta.detach()
    delta = dh.attach(model, dh.IA3(targets=["up"]))
    with delta.disabled():
        base = evaluate(model, inputs)
    assert_outputs_equal(evaluate(model, inputs), base)


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="init='ones' is unknown"):
        dh.IA3(targets=["up"], init="ones")
    with pytest.raises(dh.SpecError, match="feedforward=5 must be a target string"):
        dh.IA3(targets=["up"], feedforward=5)
    with pytest.raises(dh.SpecError, match="must be a target string"):
        dh.IA3(targets=["up"], feedforward=[nn.Linear])
    model, _ = seeded(make_net)
    not_a_target = dh.IA3(targets=["up"], feedforward=["out"])
    check_refused(model, not_a_target, dh.TargetError, "must also be a target")
    token_ids = dh.IA3(targets=["embed", "up"], feedforward=["embed"])
    check_refused(model, token_ids, dh.UnsupportedModuleError, "token ids")
    model.add_module("norm", nn.LayerNorm(4))
    check_refused(model, dh.IA3(targets=["up", "norm"]), dh.UnsupportedModuleError, "LayerNorm")


def test_reference_against_f_linear():
    """y = l ⊙ (x Wᵀ + b) for an output vector, written out."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    delta = dh.attach(model, dh.IA3(targets=["0"], init="random"))
    x = torch.randn(5, 4)
    vector = delta.state_dict()["0.ia3_l"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias) * vector)


def _layer_with_two_deltas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).eval()
    return model, torch.randn(4, 6)


@pytest.mark.parametrize("feedforward", [[], ["0"]])
def test_a_scale_merges_only_while_no_other_delta_acts_unmerged_on_its_layer(feedforward):
    model, x = _layer_with_two_deltas()
    ia3 = dh.attach(model, dh.IA3(targets=["0"], feedforward=feedforward, init="random"), name="s")
    lora = dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"), name="l")
    hooked = model(x)
    before = snapshot(model)
    with pytest.raises(dh.DeltaStateError, match="merge or detach 'l' first"):
        ia3.merge()
    assert_restored(model, before)
    lora.merge()  # the additive one first, then the scale: the output stays
    ia3.merge()
    torch.testing.assert_close(model(x), hooked)
    with pytest.raises(dh.DeltaStateError, match="unmerge 's' first"):
        lora.unmerge()
    ia3.unmerge()
    lora.unmerge()
    torch.testing.assert_close(model(x), hooked)


def test_no_new_delta_on_a_layer_with_a_merged_scale():
    model, _ = _layer_with_two_deltas()
    ia3 = dh.attach(model, dh.IA3(targets=["0"], feedforward=["0"], init="random"))
    ia3.merge()
    before = snapshot(model)
    with pytest.raises(dh.DeltaStateError, match=r"merged into '0' as a scale.*unmerge it"):
        dh.attach(model, dh.LoRA(targets=["0"]), name="late")
    assert_restored(model, before)
    dh.attach(model, dh.LoRA(targets=["1"]), name="elsewhere")  # other layers are fine


def test_lora_and_ia3_in_one_delta_merge_to_the_hooked_output():
    model, x = _layer_with_two_deltas()
    delta = dh.attach(
        model,
        [dh.IA3(targets=["0"], init="random"), dh.LoRA(targets=["0"], r=2, init="random")],
    )
    hooked = model(x)
    delta.merge()  # LoRA folds in first, then the scale applies to both
    torch.testing.assert_close(model(x), hooked)
