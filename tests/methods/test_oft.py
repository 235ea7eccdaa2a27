"""OFT: block-diagonal Cayley rotations of a layer's input space, equal to PEFT's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from method_bar import (
    check_refused,
    evaluate,
    loss,
    perturb,
    seeded,
)
from torch import nn

import deltahooks as dh
from deltahooks.methods._orthogonal import cayley, nearest_divisor, skew_from_upper

transformers = pytest.importorskip("transformers")

from method_nets import oft_net as make_net  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# OFT's rows in tests/method_table.py

NET_SPEC = dh.OFT(targets=["embed", "conv", "conv2", "up", "out"], block_size=2)


def blocks(vector: torch.Tensor, size: int, exact: bool) -> torch.Tensor:
    return torch.block_diag(*cayley(skew_from_upper(vector, size), None if exact else 5))


@pytest.mark.parametrize("exact", [False, True])
def test_the_formulas_per_layer_kind(exact):
    """Linear/Conv: W Rᵀ (a conv per flattened filter); Embedding: E R."""
    model, inputs = seeded(make_net)
    delta = dh.attach(model, dh.OFT(targets=NET_SPEC.targets, use_cayley_neumann=not exact))
    perturb(delta)
    sizes = {"embed": 4, "conv": 6, "conv2": 36, "up": 4, "out": 8}  # divisor nearest 32
    state = {key.split(".")[0]: t for key, t in delta.state_dict().items()}
    R = {name: blocks(state[name], sizes[name], exact) for name in sizes}
    for matrix in R.values() if exact else ():  # (the series is close only for small Q)
        torch.testing.assert_close(matrix @ matrix.T, torch.eye(len(matrix)), atol=1e-6, rtol=0)
    with torch.no_grad(), delta.disabled():
        reference = copy.deepcopy(model)
        reference.embed.weight.copy_(model.embed.weight @ R["embed"])
        for name in ("conv", "conv2", "up", "out"):
            weight = getattr(reference, name).weight
            weight.copy_((weight.flatten(1) @ R[name].T).view_as(weight))
        want = reference(**inputs)
    torch.testing.assert_close(evaluate(model, inputs), want, rtol=1e-5, atol=1e-6)


def test_exact_cayley_keeps_the_row_norms():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    model = nn.Sequential(layer).eval()
    delta = dh.attach(model, dh.OFT(targets=["0"], block_size=4, use_cayley_neumann=False))
    perturb(delta, std=1.0)
    norms = layer.weight.norm(dim=1)
    delta.merge()
    torch.testing.assert_close(layer.weight.norm(dim=1), norms)


def test_default_block_size_divides_any_width():
    assert [nearest_divisor(w, 32) for w in (1, 7, 32, 48, 64, 96, 97, 100, 4096)] == [
        1,
        7,
        32,
        24,
        32,
        32,
        1,
        25,
        32,
    ]
    model = nn.Sequential(nn.Linear(100, 3), nn.Linear(3, 97), nn.Linear(97, 2))
    delta = dh.attach(model, dh.OFT(targets=["0", "1", "2"]))
    shapes = {key: tuple(t.shape) for key, t in delta.state_dict().items()}
    assert shapes == {"0.oft_R": (4, 300), "1.oft_R": (1, 3), "2.oft_R": (97, 0)}


def test_gpt2_conv1d_rotates_its_input_and_merges_like_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6)).eval()  # (nf, nx): 6 → 5
    delta = dh.attach(model, dh.OFT(targets=["0"], block_size=3))
    perturb(delta)
    R = blocks(delta.state_dict()["0.oft_R"], 3, exact=False)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        with delta.disabled():
            want = model(x @ R)
        torch.testing.assert_close(model(x), want)
        delta.merge()
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="block_size=0 must be a positive integer"):
        dh.OFT(targets=["up"], block_size=0)
    with pytest.raises(dh.SpecError, match="use_cayley_neumann='yes' must be True or False"):
        dh.OFT(targets=["up"], use_cayley_neumann="yes")
    with pytest.raises(dh.SpecError, match="init='zeros' is unknown"):
        dh.OFT(targets=["up"], init="zeros")
    model, _ = seeded(make_net)
    check_refused(model, dh.OFT(targets=["up", "out"], block_size=3), dh.SpecError, "divide")
    model.add_module("norm", nn.LayerNorm(4))
    check_refused(model, dh.OFT(targets=["up", "norm"]), dh.UnsupportedModuleError, "LayerNorm")


# ------------------------------------------------------------------ PEFT parity
PEFT_PLACES = {  # PEFT's OFT takes Linear, Conv2d and Embedding (no GPT-2 Conv1D)
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "gpt2": ["wte", "wpe", "lm_head"],
}


def peft_pair(name, tmp_path, **options):
    """PEFT's OFT model with random rotations, and ours loaded from its saved adapter."""
    peft = pytest.importorskip("peft")
    model, inputs = seeded(MODELS[name])
    ours = copy.deepcopy(model)
    config = peft.OFTConfig(target_modules=PEFT_PLACES[name], init_weights=False, **options)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(model, config).eval()
    theirs.save_pretrained(tmp_path)
    delta = dh.load_peft(ours, tmp_path)
    return theirs, ours, delta, inputs


def train_both(theirs, ours, delta, inputs) -> None:
    """Five SGD steps on each from the same start: the losses agree."""
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in theirs_params) == sum(p.numel() for p in delta.parameters())
    losses = []
    for model, params in ((theirs, theirs_params), (ours, list(delta.parameters()))):
        optimizer = torch.optim.SGD(params, lr=0.5)
        losses.append([])
        for _ in range(5):
            optimizer.zero_grad()
            value = loss(model, inputs)
            value.backward()
            optimizer.step()
            losses[-1].append(value.item())
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_outputs_and_training(name, tmp_path):
    theirs, ours, delta, inputs = peft_pair(name, tmp_path)
    assert {p for p in delta.paths} == {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if hasattr(m, "oft_R") and (len(m.oft_R) or len(m.oft_embedding_R))
    }
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)
    train_both(theirs, ours, delta, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"use_cayley_neumann": False},
        {"num_cayley_neumann_terms": 3},
        {"oft_block_size": 7},  # PEFT adjusts it per layer: 32 → 8, 48 → 6
        {"oft_block_size": 0, "r": 4},
        {"module_dropout": 0.1},  # created but not applied by PEFT 0.21
    ],
)
def test_peft_parity_options(options, tmp_path):
    theirs, ours, delta, inputs = peft_pair("llama", tmp_path, **options)
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)
    if options.get("oft_block_size") == 7:
        assert sorted(spec.block_size for spec in delta.specs) == [6, 8]


def conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    return model.eval(), {"input": torch.randn(2, 4, 6, 6)}


def test_peft_parity_conv2d(tmp_path):
    """PEFT rotates a Conv2d through its merged weight ``W Rᵀ``; its unmerged forward
    (unfold, rotate, fold back with overlaps summed) equals that only for 1×1 kernels, so
    a k×k kernel is compared with PEFT's merged model."""
    peft = pytest.importorskip("peft")
    model, inputs = conv_net()
    ours = copy.deepcopy(model)
    config = peft.OFTConfig(target_modules=["0", "2"], oft_block_size=4, init_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(model, config).eval()
    theirs.save_pretrained(tmp_path)
    delta = dh.load_peft(ours, tmp_path)
    x = inputs["input"]
    with torch.no_grad():
        pointwise = theirs.base_model.model[2]  # 1×1: the unmerged forwards agree
        torch.testing.assert_close(
            ours[2](x[:, :2].repeat(1, 4, 1, 1)),
            pointwise(x[:, :2].repeat(1, 4, 1, 1)),
            rtol=0,
            atol=1e-5,
        )
        theirs.merge_adapter()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        delta.merge()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        for path in ("0", "2"):
            torch.testing.assert_close(
                ours.get_submodule(path).weight,
                theirs.base_model.model.get_submodule(path).base_layer.weight,
                rtol=0,
                atol=1e-6,
            )


@pytest.mark.parametrize(
    ("option", "match"), [({"coft": True}, "coft=True"), ({"block_share": True}, "block_share")]
)
def test_peft_features_we_do_not_implement_are_refused(option, match, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = seeded(MODELS["llama"])
    config = peft.OFTConfig(target_modules=["q_proj"], **option)
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path)
    with pytest.raises(dh.UnsupportedOperationError, match=match):
        dh.load_peft(model, tmp_path)
    assert dh.deltas(model) == {}


def test_peft_adapter_that_does_not_fit_is_refused(tmp_path):
    delta = peft_pair("llama", tmp_path)[2]
    delta.detach()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT"
    model, _ = seeded(MODELS["gpt2"])
    with pytest.raises(dh.DeltaFileError):
        dh.load_peft(model, tmp_path)
    assert dh.deltas(model) == {}
