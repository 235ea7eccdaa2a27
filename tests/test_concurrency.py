"""Threads and lifetimes: hooks keep no per-call global state; a delta lives until detached."""

from __future__ import annotations

import gc
import pickle
import threading
import weakref

import torch
from model_checks import assert_restored, snapshot
from torch import nn

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
