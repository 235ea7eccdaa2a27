"""BOFT: butterfly products of block Cayley rotations and an output scale, equal to PEFT's."""

from __future__ import annotations

import copy
from unittest import mock

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
from deltahooks.methods._orthogonal import cayley

transformers = pytest.importorskip("transformers")

from method_nets import boft_net as make_net  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# BOFT's rows in tests/method_table.py


def test_the_formulas_with_one_factor():
    """y = s ⊙ (W Mᵀ x) + b, M block-diagonal; a conv's filters are rotated the same way."""
    model, inputs = seeded(make_net)
    spec = dh.BOFT(targets=["conv", "up", "out"], block_size=2)
    delta = dh.attach(model, spec)
    perturb(delta)
    state = delta.state_dict()
    with torch.no_grad(), delta.disabled():
        reference = copy.deepcopy(model)
        for name in ("conv", "up", "out"):
            A = state[f"{name}.boft_R"][0]
            M = torch.block_diag(*cayley((A - A.mT) / 2, None))
            weight = getattr(reference, name).weight
            rotated = weight.flatten(1) @ M.T * state[f"{name}.boft_s"]
            weight.copy_(rotated.view_as(weight))
        want = reference(**inputs)
    torch.testing.assert_close(evaluate(model, inputs), want, rtol=1e-5, atol=1e-6)


def test_default_block_size_fits_the_butterfly():
    model = nn.Sequential(nn.Linear(24, 5), nn.Linear(5, 7), nn.Linear(7, 2))
    delta = dh.attach(model, dh.BOFT(targets=["0", "1", "2"]))
    shapes = {key: tuple(t.shape) for key, t in delta.state_dict().items() if "_R" in key}
    assert shapes == {"0.boft_R": (1, 6, 4, 4), "1.boft_R": (1, 1, 5, 5), "2.boft_R": (1, 7, 1, 1)}
    delta.detach()
    delta = dh.attach(model, dh.BOFT(targets=["0"], butterfly_factor=3))  # 2 · 2² divides 24
    assert tuple(delta.state_dict()["0.boft_R"].shape) == (3, 12, 2, 2)


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="butterfly_factor=0 must be a positive integer"):
        dh.BOFT(targets=["up"], butterfly_factor=0)
    with pytest.raises(dh.SpecError, match="must be even"):
        dh.BOFT(targets=["up"], block_size=3, butterfly_factor=2)
    with pytest.raises(dh.SpecError, match="init='ones' is unknown"):
        dh.BOFT(targets=["up"], init="ones")
    model, _ = seeded(make_net)
    check_refused(model, dh.BOFT(targets=["up", "out"], block_size=3), dh.SpecError, "divide")
    model.add_module("odd", nn.Conv1d(3, 2, 2))  # filter width 6: no even b with 2b | 6
    odd = dh.BOFT(targets=["up", "odd"], butterfly_factor=2)
    check_refused(model, odd, dh.SpecError, "even block_size")
    model.add_module("embed", nn.Embedding(3, 4))
    check_refused(model, dh.BOFT(targets=["embed"]), dh.UnsupportedModuleError, "Embedding")


# ------------------------------------------------------------------ PEFT parity
def block_diag_batch(blocks: torch.Tensor) -> torch.Tensor:
    """What PEFT's CUDA ``FastBlockDiag`` computes, in torch: ``(N, D, b, b)`` → ``(N, Db, Db)``."""
    return torch.stack([torch.block_diag(*level) for level in blocks])


@pytest.fixture
def peft_boft():
    """PEFT's BOFT without building its CUDA extension: butterfly factors above 1 need it
    (PEFT falls back to one factor), so its block-diagonal kernel is replaced by torch's."""
    peft = pytest.importorskip("peft")
    from peft.tuners.boft import layer

    with (
        mock.patch.object(layer, "get_fbd_cuda", lambda: True),
        mock.patch.object(layer.FastBlockDiag, "apply", block_diag_batch),
    ):
        yield peft


PEFT_PLACES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["lm_head"]}


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


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_outputs_and_training(peft_boft, name, factor, tmp_path):
    model, inputs = seeded(MODELS[name])
    ours = copy.deepcopy(model)
    config = peft_boft.BOFTConfig(
        target_modules=PEFT_PLACES[name],
        boft_block_size=4,
        boft_n_butterfly_factor=factor,
        init_weights=False,
    )
    torch.manual_seed(3)
    theirs = peft_boft.get_peft_model(model, config).eval()
    theirs.save_pretrained(tmp_path)
    delta = dh.load_peft(ours, tmp_path)
    assert {spec.butterfly_factor for spec in delta.specs} == {factor}
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)
    if factor == 2:
        train_both(theirs, ours, delta, inputs)
        torch.testing.assert_close(
            evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5
        )
        if name == "gpt2":  # lm_head is tied to wte: PEFT would change the embedding too
            with pytest.raises(dh.DeltaStateError, match="tied weights"):
                delta.merge()
            return
        delta.merge()
        theirs.merge_adapter()
        torch.testing.assert_close(
            evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5
        )


def test_peft_parity_conv2d(peft_boft, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    x = torch.randn(2, 8, 6, 6)  # filter widths 72 and 8
    ours = copy.deepcopy(model)
    config = peft_boft.BOFTConfig(
        target_modules=["0", "2"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False
    )
    theirs = peft_boft.get_peft_model(model, config).eval()
    theirs.save_pretrained(tmp_path)
    delta = dh.load_peft(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        delta.merge()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_peft_boft_dropout_is_refused(peft_boft, tmp_path):
    model, _ = seeded(MODELS["llama"])
    config = peft_boft.BOFTConfig(target_modules=["q_proj"], boft_dropout=0.1)
    peft_boft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path)
    with pytest.raises(dh.UnsupportedOperationError, match=r"boft_dropout=0\.1"):
        dh.load_peft(model, tmp_path)
    assert dh.deltas(model) == {}
