"""VeRA: shared frozen random projections, trained vectors, PEFT's math, init and files."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from method_bar import (
    check_refused,
    evaluate,
    loss,
    perturb,
    seeded,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot
from safetensors import safe_open
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import vera_net as make_net  # noqa: E402
from method_table import VERA_PLACES as PLACES  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# VeRA's rows in tests/method_table.py


def test_the_formula_with_projection_corners():
    model, inputs = make_net()
    delta = dh.attach(model, dh.VeRA(targets=["0", "2"], r=5, init="random"))
    state = delta.state_dict()
    a, b = state["vera_A"], state["vera_B"]
    assert a.shape == (5, 10) and b.shape == (10, 5)  # widest fan-in (10), fan-out (10)
    x = inputs["input"]

    def vera(layer, path, h):
        d, lb = state[f"{path}.vera_lambda_d"], state[f"{path}.vera_lambda_b"]
        fan_out, fan_in = layer.weight.shape
        return layer(h) + lb * F.linear(d * F.linear(h, a[:, :fan_in]), b[:fan_out])

    with torch.no_grad(), delta.disabled():
        want = model[3](vera(model[2], "2", torch.relu(vera(model[0], "0", x))))
    torch.testing.assert_close(evaluate(model, inputs), want)


def test_only_the_vectors_train_and_the_projections_are_stored_once(tmp_path):
    model, _ = make_net()
    delta = dh.attach(model, dh.VeRA(targets=nn.Linear, r=8))
    names = sorted(n for n, _ in delta.named_parameters())
    assert names == [f"{i}.vera_lambda_{v}" for i in (0, 2, 3) for v in "bd"]
    assert dict(delta.named_buffers()).keys() == {"vera_A", "vera_B"}
    assert not any(b.requires_grad for _, b in delta.named_buffers())
    delta.save(tmp_path / "v.safetensors")
    with safe_open(tmp_path / "v.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys.count("vera_A") == 1 and len(keys) == 8
    # base keys unchanged (the delta's tensors are reserved), strict base load passes
    base = {k: v for k, v in model.state_dict().items() if "dh__" not in k}
    assert list(base) == ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    model.load_state_dict(base, strict=True)


def test_without_saved_projections_the_file_is_smaller_and_loads_the_same(tmp_path):
    model, inputs = make_net()
    fresh = copy.deepcopy(model)
    delta = dh.attach(model, dh.VeRA(targets=nn.Linear, r=8, save_projection=False))
    perturb(delta)
    assert list(delta.state_dict()) == [f"{i}.vera_lambda_{v}" for i in (0, 2, 3) for v in "bd"]
    delta.save(tmp_path / "v.safetensors")
    with safe_open(tmp_path / "v.safetensors", "pt") as handle:
        assert "vera_A" not in handle.keys()
    dh.load(fresh, tmp_path / "v.safetensors")
    assert_outputs_equal(evaluate(fresh, inputs), evaluate(model, inputs))
    spec = dh.VeRA(targets=nn.Linear, r=8, projection_prng_key=1)
    other = dh.attach(model, spec, name="other")
    assert not torch.equal(other.shared["vera_A"], model.dh__default__vera_A)


def test_projections_follow_the_model_dtype_and_device():
    model, _ = make_net()
    model.to(torch.float64)
    delta = dh.attach(model, dh.VeRA(targets=nn.Linear, r=4, init="random"))
    assert {t.dtype for t in delta.state_dict().values()} == {torch.float64}
    assert model(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_dropout_acts_only_in_training():
    model, inputs = seeded(make_net)
    delta = dh.attach(model, dh.VeRA(targets=["0"], r=4, dropout=0.5, init="random"))
    with delta.disabled():
        base = evaluate(model, inputs)
    eval_out = evaluate(model, inputs)
    assert_outputs_equal(evaluate(model, inputs), eval_out)
    model.train()
    torch.manual_seed(3)
    trained = evaluate(model, inputs)
    assert not torch.equal(trained, eval_out) and not torch.equal(trained, base)


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="r=0 must be a positive integer"):
        dh.VeRA(targets=["0"], r=0)
    with pytest.raises(dh.SpecError, match="projection_prng_key=-1 must be an integer seed"):
        dh.VeRA(targets=["0"], projection_prng_key=-1)
    with pytest.raises(dh.SpecError, match="save_projection='yes' must be True or False"):
        dh.VeRA(targets=["0"], save_projection="yes")
    with pytest.raises(dh.SpecError, match="init='ones' is unknown"):
        dh.VeRA(targets=["0"], init="ones")
    model, _ = make_net()
    model.add_module("norm", nn.LayerNorm(3))
    check_refused(model, dh.VeRA(targets=["0", "norm"]), dh.UnsupportedModuleError, "LayerNorm")
    model.add_module("embed", nn.Embedding(5, 3))
    check_refused(model, dh.VeRA(targets=["embed"]), dh.UnsupportedModuleError, "Embedding")


# ------------------------------------------------------------------ PEFT parity
def _peft_pair(name: str, tmp_path, save_projection: bool):
    """PEFT's VeRA (non-identity start) and ours loaded from its save_pretrained dir."""
    peft = pytest.importorskip("peft")
    model, inputs = seeded(MODELS[name])
    ours = copy.deepcopy(model)
    config = peft.VeraConfig(
        target_modules=PLACES[name], r=16, init_weights=False, save_projection=save_projection
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False and fan_in_fan_out notes
        theirs = peft.get_peft_model(model, config)
        theirs.save_pretrained(tmp_path / "peft")
        delta = dh.load_peft(ours, tmp_path / "peft")
    return theirs, ours, delta, inputs


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_outputs_merge_and_five_training_steps(name, save_projection, tmp_path):
    theirs, ours, delta, inputs = _peft_pair(name, tmp_path, save_projection)
    assert delta.specs[0].save_projection is save_projection
    projection = theirs.base_model.vera_A["default"]
    assert torch.equal(
        delta.shared["vera_A"] if save_projection else ours.dh__default__vera_A, projection
    )
    theirs.eval()
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)

    losses = []
    for model, params in ((theirs, None), (ours, delta.parameters())):
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        optimizer = torch.optim.Adam(params, lr=1e-2)
        run = []
        for _ in range(5):
            optimizer.zero_grad()
            value = loss(model, inputs)
            value.backward()
            optimizer.step()
            run.append(value.item())
        losses.append(run)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)
    delta.merge()
    theirs.merge_adapter()
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)


def test_peft_import_refuses_missing_projections_and_stray_tensors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    _, ours, delta, _ = _peft_pair("llama", tmp_path, True)
    delta.detach()
    before = snapshot(ours)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k}, weights)
    with pytest.raises(dh.DeltaFileError, match=r"holds no base_model\.vera_A"):
        dh.load_peft(ours, tmp_path / "peft")
    save_file({**tensors, "base_model.model.lm_head.vera_lambda_x": torch.ones(2)}, weights)
    with pytest.raises(dh.DeltaFileError, match="belong to no VeRA layer"):
        dh.load_peft(ours, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 8}))
    save_file(tensors, weights)
    with pytest.raises(dh.DeltaFileError, match="shape"):
        dh.load_peft(ours, tmp_path / "peft")
    assert_restored(ours, before)
