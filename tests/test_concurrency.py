"""Threads and lifetimes: hooks keep no per-call global state; a delta lives until detached."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading
import weakref

import pytest
import torch
from model_checks import assert_restored, snapshot
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import deltahooks as dh


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Linear(32, 4)).eval()


def test_two_threads_get_the_serial_results():
    model = make_model()
    dh.attach(model, [dh.LoRA(targets=["0", "2"], init="random"), dh.Full(targets=["3"])])
    inputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(indices):
        try:
            with torch.no_grad():
                for _ in range(5):
                    for i in indices:
                        results[i] = model(inputs[i])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(range(k, 40, 2),)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i, want in enumerate(serial):
        assert torch.equal(results[i], want)


def test_a_dropped_delta_stays_attached_until_detached():
    model = make_model()
    before = snapshot(model)
    x = torch.randn(2, 16)
    with torch.no_grad():
        base = model(x)
    probe = weakref.ref(dh.attach(model, dh.LoRA(targets=["0"], init="random")))
    gc.collect()
    assert probe() is not None, "the model keeps its delta alive"
    with torch.no_grad():
        assert not torch.equal(model(x), base)
    dh.detach(model)
    gc.collect()
    assert probe() is None, "after detach nothing keeps the delta alive"
    assert_restored(model, before)


def test_pickle_of_an_attached_model_carries_a_working_delta():
    model = make_model()
    dh.attach(model, [dh.LoRA(targets=["0"], init="random"), dh.Full(targets=["3"])])
    x = torch.randn(2, 16)
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    clone_delta = dh.deltas(clone)["default"]
    with torch.no_grad():
        clone_delta.state_dict(keep_vars=True)["0.lora_B"].zero_()
        assert not torch.equal(clone(x), model(x))  # independent tensors
    dh.detach(clone)
    assert list(clone.state_dict()) == list(make_model().state_dict())


WEIGHT_SITES = {  # methods that act through torch.nn.utils.parametrize
    "loha": lambda: dh.LoHa(targets=["0", "2"], r=2, init="random"),
    "lokr": lambda: dh.LoKr(targets=["0", "2"], r=2, init="random"),
    "lora_parameters": lambda: dh.LoRA(targets=["0.weight", "3.weight"], r=2, init="random"),
    "ln_tuning": lambda: dh.LNTuning(targets=["0"]),  # a Linear's weight and bias, as a norm's
}


def copy_of(model: nn.Module, how: str) -> nn.Module:
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def perturbed(delta: dh.Delta) -> dh.Delta:
    with torch.no_grad():
        for tensor in delta.parameters():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return delta


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
@pytest.mark.parametrize("method", list(WEIGHT_SITES))
def test_a_copy_of_a_model_with_a_weight_site_delta_works_and_detaches_to_the_base(method, how):
    spec = WEIGHT_SITES[method]()
    if method == "ln_tuning":  # LNTuning targets norms: a LayerNorm-shaped Linear stand-in
        spec = dh.LNTuning(targets=[nn.LayerNorm])
    model = nn.Sequential(make_model(), nn.LayerNorm(4)) if method == "ln_tuning" else make_model()
    base = copy.deepcopy(model)  # before any delta: what every detach must give back
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected_base = base(x)
    delta = perturbed(dh.attach(model, spec))
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    keys = list(model.state_dict())
    with torch.no_grad():
        tuned = model(x)
    assert not torch.equal(tuned, expected_base)

    clone = copy_of(model, how)

    with torch.no_grad():
        assert torch.equal(clone(x), tuned)
    assert list(clone.state_dict()) == keys
    clone_delta = dh.deltas(clone)["default"]
    assert clone_delta.state_dict().keys() == delta.state_dict().keys()
    with torch.no_grad():  # the copy's delta tensors are its own
        for tensor in clone_delta.parameters():
            tensor.zero_()
        assert torch.equal(model(x), tuned)
    dh.detach(clone)
    with torch.no_grad():
        assert torch.equal(clone(x), expected_base)
    assert list(clone.state_dict()) == list(base.state_dict())
    for key, value in base.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    assert [type(m) for m in clone.modules()] == [type(m) for m in base.modules()]
    assert not any(parametrize.is_parametrized(m) for m in clone.modules())
    dh.detach(model)  # the original kept its delta, and detaches on its own
    with torch.no_grad():
        assert torch.equal(model(x), expected_base)
    assert list(model.state_dict()) == list(base.state_dict())


def test_a_pickled_copy_trains_and_saves_like_the_original(tmp_path):
    model = make_model()
    perturbed(dh.attach(model, WEIGHT_SITES["loha"]()))
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(5, 16)
    for net in (model, clone):
        net.train()
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        net(x).square().mean().backward()
        optimizer.step()
    dh.deltas(clone)["default"].save(tmp_path / "clone.safetensors")
    dh.deltas(model)["default"].save(tmp_path / "model.safetensors")
    saved = [load_file(tmp_path / f"{name}.safetensors") for name in ("clone", "model")]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.equal(saved[0][key], saved[1][key]), key


def test_pickling_a_weight_site_on_a_weight_norm_layer_says_what_to_do():
    model = make_model()
    weight_norm(model[0])
    dh.attach(model, WEIGHT_SITES["loha"]())
    for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(dh.UnsupportedOperationError, match=r"_WeightNorm.*delta\.save"):
            save(model)
    twin = copy.deepcopy(model)  # deep copies work: nothing is serialised
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
