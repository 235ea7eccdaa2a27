"""The testing bar every method meets, as checks that method tests call with their specs.

Each check builds what it needs from ``make() -> (model, inputs)`` (seeded, so two calls
give the same model and inputs); ``inputs`` is a dict of keyword arguments. Outputs are
``.logits`` where the model returns a ``ModelOutput``.
"""

from __future__ import annotations

import copy

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
    make, spec, tmp_path, *, every_grad: bool = True
) -> dh.Delta:
    """Outputs unchanged at attach; gradients only to the delta; the loss falls; save →
    load on a fresh copy reproduces the outputs exactly; detach restores bit for bit.

    ``every_grad=False`` for methods whose zero start blocks some first gradients (a
    factor multiplied by a zero one, as LoRA's ``A`` by ``B = 0``): then some must flow.
    """
    model, inputs = seeded(make)
    fresh = copy.deepcopy(model)
    before, base = snapshot(model), evaluate(model, inputs)
    delta = dh.attach(model, spec)
    with delta.disabled():  # frozen base weights: the same kernels as the delta's forward
        frozen = evaluate(model, inputs)
    assert_outputs_equal(evaluate(model, inputs), frozen)
    # (CPU convolutions may pick another kernel once their weight needs no grad)
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
            assert with_grad == delta_names, with_grad ^ delta_names
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
    model, inputs = seeded(make)
    delta = dh.attach(model, spec)
    perturb(delta)
    hooked, state = evaluate(model, inputs), snapshot(model)
    try:
        delta.merge()
    except dh.UnsupportedOperationError as err:
        assert match in str(err), err
    else:
        raise AssertionError("merge was not refused")
    assert not delta.merged
    assert_restored(model, state)
    assert_outputs_equal(evaluate(model, inputs), hooked)


def check_gradient_checkpointing(make, spec, use_reentrant: bool) -> None:
    """HF gradient checkpointing (train mode) gives the grads of a plain backward."""
    grads = []
    for checkpointing in (False, True):
        model, inputs = seeded(make)
        delta = dh.attach(model, spec)
        perturb(delta)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
        model.train()
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss(model, inputs).backward()
        grads.append({n: p.grad for n, p in delta.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def check_compile(make, spec) -> None:
    """No graph break; compiled (fullgraph) matches eager, enabled and disabled."""
    model, inputs = seeded(make)
    delta = dh.attach(model, spec)
    perturb(delta)
    dynamo.reset()
    try:
        explained = dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        eager = evaluate(model, inputs)
        torch.testing.assert_close(evaluate(compiled, inputs), eager)
        with delta.disabled():
            torch.testing.assert_close(evaluate(compiled, inputs), evaluate(model, inputs))
        torch.testing.assert_close(evaluate(compiled, inputs), eager)
    finally:
        dynamo.reset()


def check_refused(model, spec, error: type[Exception], match: str) -> None:
    """A bad attach raises ``error`` with a message matching ``match``; the model is as it was."""
    before = snapshot(model)
    try:
        dh.attach(model, spec)
    except error as err:
        assert match in str(err), err
    else:
        raise AssertionError(f"attach did not raise {error.__name__}")
    assert_restored(model, before)
    assert dh.deltas(model) == {}
