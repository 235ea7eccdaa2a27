"""The README's "Write your own method" example works as a built-in method does."""

from __future__ import annotations

import copy
import pathlib
import re

import torch
from model_checks import assert_outputs_equal, assert_restored, snapshot

import deltahooks as dh

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> dict:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- own-method-example -->\s*```python\n(.*?)```", text, re.S)
    assert block is not None, "the README lost its own-method example"
    assert len(block.group(1).strip().splitlines()) <= 45, "keep the example short"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace


def test_the_readme_method_attaches_trains_saves_merges_and_detaches(tmp_path):
    Gain = readme_example()["Gain"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    pristine = copy.deepcopy(model)
    before = snapshot(model)
    x = torch.randn(16, 4)
    base = model(x)

    delta = dh.attach(model, Gain(targets=torch.nn.Linear))
    assert_outputs_equal(model(x), base)  # a gain of 1 changes nothing
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) - 1).pow(2).mean().backward()
        optimizer.step()
    tuned = model(x)
    assert not torch.allclose(tuned, base)
    assert all(p.grad is None for n, p in model.named_parameters() if "dh__" not in n)

    path = tmp_path / "gain.safetensors"
    delta.save(path)
    fresh = copy.deepcopy(pristine)
    dh.load(fresh, path)
    assert_outputs_equal(fresh(x), tuned)

    model.eval()
    delta.merge()
    torch.testing.assert_close(model(x), tuned)
    delta.unmerge()
    assert_outputs_equal(model(x), tuned)
    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(model(x), base)
