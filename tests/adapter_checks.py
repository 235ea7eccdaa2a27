"""What every residual adapter method promises, checked for one model and one spec.

The tests of ParallelAdapter, LowRankAdapter and Compacter call these on tiny transformers
models (and plain torch modules); each check builds its model afresh from a seed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo as dynamo
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh


class Logits(nn.Module):
    """A plain torch module that answers like a transformers model (``.logits``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return SimpleNamespace(logits=self.inner(x))


def plain(make_module, *shape):
    """A model builder for the checks from a plain torch module and an input shape."""
    return lambda: (Logits(make_module()), {"x": torch.randn(*shape)})


def build(make):
    """A model in eval mode and its inputs, the same for the same ``make``."""
    torch.manual_seed(0)
    model, inputs = make()
    return model.eval(), inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def loss(model, inputs, target) -> torch.Tensor:
    return (model(**inputs).logits.float() - target).pow(2).mean()


def randomize(delta: dh.Delta, seed: int = 1) -> None:
    """Non-zero values everywhere, so the delta changes outputs and every tensor gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    state = delta.state_dict()
    delta.load_state_dict(
        {key: torch.randn(value.shape, generator=generator) * 0.2 for key, value in state.items()}
    )


def check_lifecycle(make, spec: dh.DeltaSpec, tmp_path) -> dh.Delta:
    """Identity at init; gradients only to the delta; a few steps lower the loss; merge is
    refused; save -> load on a fresh copy reproduces outputs exactly; detach restores."""
    model, inputs = build(make)
    fresh = copy.deepcopy(model)
    before, base = snapshot(model), logits(model, inputs)
    delta = dh.attach(model, spec)
    assert_outputs_equal(logits(model, inputs), base)  # identity at init, bit-exact

    model.train()
    loss(model, inputs, torch.zeros_like(base)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    own = {name for name, p in model.named_parameters() if "dh__" in name}
    assert with_grad == own and own, "gradients must reach the delta and nothing else"
    model.zero_grad(set_to_none=True)
    model.eval()  # train without dropout: the loss is a function of the delta alone

    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(delta.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        value = loss(model, inputs, target)
        losses.append(value.item())
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses
    trained = logits(model, inputs)
    assert not torch.equal(trained, base)

    merged_before = snapshot(model)
    with pytest.raises(dh.UnsupportedOperationError, match="non-linear"):
        delta.merge()
    assert not delta.merged
    assert_restored(model, merged_before)

    path = tmp_path / f"{spec.method}.safetensors"
    delta.save(path)
    dh.load(fresh, path)
    assert_outputs_equal(logits(fresh, inputs), trained)

    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(logits(model, inputs), base)
    return delta


def enable_checkpointing(model, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_checkpointing(make, spec: dh.DeltaSpec, reentrant: bool) -> None:
    """Gradient checkpointing in train mode gives the delta the same gradients as without,
    and really recomputes (the target layers' Linear modules run again in backward)."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model, inputs = build(make)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # same forward with and without recomputation
        delta = dh.attach(model, spec)
        randomize(delta)
        if checkpointing:
            enable_checkpointing(model, reentrant)
        count = _Counter()
        handles = [m.register_forward_hook(count) for m in model.modules() if type(m) is nn.Linear]
        model.train()
        model(**inputs).logits.pow(2).mean().backward()
        for handle in handles:
            handle.remove()
        grads.append({name: p.grad for name, p in delta.named_parameters()})
        calls.append(count.calls)
    assert calls[1] > calls[0], "checkpointing did not recompute anything"
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *_) -> None:
        self.calls += 1


def check_compile(make, spec: dh.DeltaSpec) -> None:
    """``torch.compile(fullgraph=True)`` traces the hooks without a graph break, matches
    eager (delta on and off) and trains."""
    model, inputs = build(make)
    delta = dh.attach(model, spec)
    randomize(delta)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        eager = logits(model, inputs)
        torch.testing.assert_close(logits(compiled, inputs), eager)
        with delta.disabled():
            base = logits(model, inputs)
            torch.testing.assert_close(logits(compiled, inputs), base)
        assert not torch.allclose(base, eager)
        model.train()
        compiled(**inputs).logits.pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    finally:
        dynamo.reset()


def check_refused(model: nn.Module, attach, error: type[Exception], match: str) -> None:
    """A bad attach raises ``error`` naming the problem, and leaves the model bit-identical."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        attach()
    assert_restored(model, before)
    assert dh.deltas(model) == {}
