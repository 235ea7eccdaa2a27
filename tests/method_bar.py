"""The testing bar every method meets: the checks tests/methods/test_method_table.py runs
for each row of tests/method_table.py (and other tests call with specs of their own).

Each check builds what it needs from ``make() -> (model, inputs)`` (seeded, so two calls
give the same model and inputs); ``inputs`` is a dict of keyword arguments. Outputs are
``.logits`` where the model returns a ``ModelOutput``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from model_checks import assert_outputs_equal, assert_restored, snapshot

import deltahooks as dh


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def evaluate(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output(model, inputs)


def loss(model, inputs) -> torch.Tensor:
    """Cross-entropy of the outputs' last dimension against fixed random labels."""
    logits = output(model, inputs).float()
    labels = torch.randint(
        0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(7)
    )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def perturb(delta: dh.Delta, std: float = 0.2, seed: int = 1) -> None:
    """Move every trainable delta tensor away from its identity start, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)


def seeded(make):
    torch.manual_seed(0)
    model, inputs = make()
    return model.eval(), inputs


def check_identity_training_files_and_detach(
    make,
    spec,
    tmp_path,
    *,
    every_grad: bool = True,
    identity: bool = True,
    atol: float = 0.0,
    other_kernels: bool = False,
    params: int | None = None,
) -> dh.Delta:
    """Outputs unchanged at attach; gradients only to the delta; the loss falls; save →
    load on a fresh copy reproduces the outputs; detach restores both models bit for bit.

    ``every_grad=False`` for methods whose zero start blocks some first gradients (a
    factor multiplied by a zero one, as LoRA's ``A`` by ``B = 0``): then some must flow.
    ``identity=False`` where the start is not the base model (a prompt, a random init):
    then the disabled delta must be. ``atol``: how far the outputs at attach may be from
    the base (PiSSA's layer reads ``W - sBA + sBA``, which rounds); 0 asks for bit-exact.
    ``other_kernels``: freezing a convolution's weight makes CPU pick another kernel, so
    the outputs at attach equal the disabled delta's bit for bit, the base's within 1e-6.
    ``params``: how many trainable numbers the delta holds.
    """
    model, inputs = seeded(make)
    fresh = copy.deepcopy(model)
    before, fresh_before, base = snapshot(model), snapshot(fresh), evaluate(model, inputs)
    delta = dh.attach(model, spec)
    if params is not None:
        assert sum(p.numel() for p in delta.parameters()) == params
    with delta.disabled():  # frozen base weights: the same kernels as the delta's forward
        frozen = evaluate(model, inputs)
    if identity:
        hooked = evaluate(model, inputs)
        torch.testing.assert_close(hooked, frozen, rtol=0, atol=atol, equal_nan=True)
        if not other_kernels:
            torch.testing.assert_close(hooked, base, rtol=0, atol=atol, equal_nan=True)
    torch.testing.assert_close(frozen, base, rtol=1e-6, atol=1e-6)

    optimizer = torch.optim.Adam(delta.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):  # eval mode: no dropout, the same batch gives the same loss
        optimizer.zero_grad()
        value = loss(model, inputs)
        value.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            delta_names = {n for n, p in model.named_parameters() if "dh__" in n}
            assert with_grad == delta_names and delta_names, with_grad ^ delta_names
            flowing = [bool(p.grad.abs().sum() > 0) for p in delta.parameters()]
            assert any(flowing), flowing
        if len(losses) == 1:  # a zero factor (LoHa's B₂) stops the others' grads on step one
            flowing = [bool(p.grad.abs().sum() > 0) for p in delta.parameters()]
            assert all(flowing) if every_grad else any(flowing), flowing
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0], losses
    trained = evaluate(model, inputs)
    assert not torch.equal(trained, base)

    delta.save(tmp_path / "delta.safetensors")
    loaded = dh.load(fresh, tmp_path / "delta.safetensors")
    assert_outputs_equal(evaluate(fresh, inputs), trained)
    loaded.detach()
    assert_restored(fresh, fresh_before)

    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(evaluate(model, inputs), base)
    return delta


def check_merge(make, spec, *, atol: float = 1e-5) -> None:
    """Merged ≈ hooked, and unmerge gives back the exact tensors and outputs."""
    model, inputs = seeded(make)
    delta = dh.attach(model, spec)
    perturb(delta)
    hooked = evaluate(model, inputs)
    state = snapshot(model)
    delta.merge()
    torch.testing.assert_close(evaluate(model, inputs), hooked, rtol=1e-5, atol=atol)
    delta.unmerge()
    assert_unmerged(model, state)
    assert_outputs_equal(evaluate(model, inputs), hooked)


def assert_unmerged(model, state) -> None:
    """``model`` is what ``state`` recorded before a merge, up to torch's parametrized classes.

    Unmerge re-registers a weight site's parametrization, and torch gives the module a
    new ``Parametrized<Class>`` subclass of the same class each time it does that.
    """
    state = copy.copy(state)
    state.classes = dict(state.classes)
    for path, module in model.named_modules(remove_duplicate=False):
        was, now = state.classes.get(path), type(module)
        if was is not now and was is not None and was.__name__.startswith("Parametrized"):
            if now.__name__ == was.__name__ and now.__bases__ == was.__bases__:
                state.classes[path] = now
    assert_restored(model, state, same_hook_ids=False)


def check_merge_refused(make, spec, match: str) -> None:
    """Merge raises ``dh.UnsupportedOperationError`` matching ``match`` (a regular
    expression); the model, its outputs and the delta's state are as they were."""
    model, inputs = seeded(make)
    delta = dh.attach(model, spec)
    perturb(delta)
    hooked, state = evaluate(model, inputs), snapshot(model)
    with pytest.raises(dh.UnsupportedOperationError, match=match):
        delta.merge()
    assert not delta.merged
    assert_restored(model, state)
    assert_outputs_equal(evaluate(model, inputs), hooked)


def enable_checkpointing(model, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_gradient_checkpointing(make, spec, use_reentrant: bool) -> None:
    """HF gradient checkpointing (train mode, dropout on) really recomputes (submodules run
    again in backward) and gives every delta tensor the non-zero grad of a plain backward."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model, inputs = seeded(make)
        delta = dh.attach(model, spec)
        perturb(delta)
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        count = _Counter()
        handles = [m.register_forward_hook(count) for m in model.modules() if m is not model]
        model.train()
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss(model, inputs).backward()
        for handle in handles:
            handle.remove()
        grads.append({n: p.grad for n, p in delta.named_parameters()})
        calls.append(count.calls)
    assert calls[1] > calls[0], "checkpointing did not recompute anything"
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None and grads[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *_) -> None:
        self.calls += 1


def check_compile(make, spec) -> None:
    """``torch.compile(fullgraph=True)`` traces the hooks and their backward without a
    graph break (it raises on one), matches eager with the delta enabled and disabled, and
    gives every delta tensor a gradient. (Grad mode throughout: one graph per state.)"""
    model, inputs = seeded(make)
    delta = dh.attach(model, spec)
    perturb(delta)
    dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        eager = evaluate(model, inputs)
        torch.testing.assert_close(output(compiled, inputs).detach(), eager)
        with delta.disabled():
            base = evaluate(model, inputs)
            torch.testing.assert_close(output(compiled, inputs).detach(), base)
        assert not torch.allclose(base, eager)
        loss(compiled, inputs).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    finally:
        dynamo.reset()


def check_meta_plan(make, spec) -> None:
    """Attach on a model built on the ``meta`` device plans the same tensors (names, shapes,
    dtypes) as on the real model, allocates nothing, and detach leaves the model as it was."""
    model, _ = seeded(make)
    real = {k: (t.shape, t.dtype) for k, t in dh.attach(model, spec).state_dict().items()}
    with torch.device("meta"):
        meta, _ = seeded(make)
    before = snapshot(meta)
    delta = dh.attach(meta, spec)
    state = delta.state_dict()
    assert all(t.is_meta for t in state.values())
    assert {k: (t.shape, t.dtype) for k, t in state.items()} == real
    delta.detach()
    assert_restored(meta, before)


def check_refused(model, spec, error: type[Exception], match: str) -> None:
    """A bad attach raises ``error`` with a message matching ``match`` (a regular
    expression); the model is as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dh.attach(model, spec)
    assert_restored(model, before)
    assert dh.deltas(model) == {}
