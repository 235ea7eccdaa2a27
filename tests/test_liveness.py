"""No silent dead deltas: a delta part that cannot act, or that gets no gradient, is named.

A hook acts only when its module is called; a parent that reads a child's weight itself
(``F.linear(x, self.child.weight)``) never calls the child. After the first forward of the
model in which the delta is active, such modules are named in one ``dh.DeadSiteWarning``;
after the first backward through the model's output, trainable delta tensors that got no
gradient are named in one ``dh.NoGradientWarning``. pyproject.toml hides ``DeltaWarning``
by default, so every test here records warnings with ``simplefilter("always")``.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from model_checks import assert_restored, snapshot
from torch import nn
from torch.utils.checkpoint import checkpoint

import deltahooks as dh

WIDTH = 8


class ReadsChild(nn.Module):
    """``used`` is called; ``child`` is only read: its weight goes into ``F.linear`` here."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(WIDTH, WIDTH)
        self.child = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.used(x), self.child.weight, self.child.bias)


class Calls(nn.Module):
    """A stack of layers of which only those marked in ``calls`` run in forward."""

    def __init__(self, calls: list[bool]) -> None:
        super().__init__()
        self.calls = calls
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in calls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for called, layer in zip(self.calls, self.layers):
            x = torch.tanh(layer(x)) if called else x
        return x


class Detached(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def recorded(run) -> dict[type, list[str]]:
    """The deltahooks warnings that ``run()`` raises, as messages by class."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    found: dict[type, list[str]] = {}
    for item in caught:
        if issubclass(item.category, dh.DeltaWarning):
            found.setdefault(item.category, []).append(str(item.message))
    return found


def train_step(model: nn.Module) -> None:
    model(torch.randn(3, WIDTH)).pow(2).mean().backward()


ADAPTERS = [
    pytest.param(lambda targets: dh.Adapter(targets=targets, bottleneck=2), id="adapter"),
    pytest.param(lambda targets: dh.LowRankAdapter(targets=targets), id="low_rank_adapter"),
]


# ------------------------------------------------------------------------ dead sites
@pytest.mark.parametrize("make_spec", ADAPTERS)
def test_a_child_whose_weight_its_parent_reads_is_named_once(make_spec):
    torch.manual_seed(0)
    model = ReadsChild()
    dh.attach(model, make_spec(["used", "child"]))
    first = recorded(lambda: train_step(model))
    (dead,) = first[dh.DeadSiteWarning]
    assert "'child' (Linear, 1 module)" in dead and "'used'" not in dead
    assert "reads their weights directly" in dead and "dh.LoRA(targets=['child.weight'])" in dead
    (no_grad,) = first[dh.NoGradientWarning]
    assert re.search(
        r"of the \d+ trainable tensors of delta 'default' received no gradient", no_grad
    )
    assert "'child." in no_grad and "'used." not in no_grad
    assert recorded(lambda: [train_step(model) for _ in range(2)]) == {}  # once per delta


@pytest.mark.parametrize("make_spec", ADAPTERS)
def test_a_model_whose_every_adapted_module_runs_warns_nothing(make_spec):
    torch.manual_seed(0)
    model = Calls([True, True, True])
    dh.attach(model, make_spec(["layers.0", "layers.2"]))
    assert recorded(lambda: train_step(model)) == {}


def test_torch_multi_head_attention_never_calls_its_out_proj():
    """``F.multi_head_attention_forward`` reads ``out_proj.weight`` itself."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    dh.attach(model, dh.Adapter(targets=["out_proj", "linear1"], bottleneck=2))
    found = recorded(lambda: model(torch.randn(2, 5, 16)).sum().backward())
    (dead,) = found[dh.DeadSiteWarning]
    assert "'layers.0.self_attn.out_proj', 'layers.1.self_attn.out_proj' (" in dead
    assert "linear1" not in dead
    (no_grad,) = found[dh.NoGradientWarning]
    assert no_grad.startswith("8 of the 16 trainable tensors")


@given(calls=st.lists(st.booleans(), min_size=1, max_size=6))
def test_exactly_the_modules_never_called_are_named(calls):
    torch.manual_seed(0)
    model = Calls(calls)
    before = snapshot(model)
    delta = dh.attach(model, dh.Adapter(targets=nn.Linear, bottleneck=2, init="random"))
    x = torch.randn(3, WIDTH, requires_grad=True)  # a backward runs even if no layer does
    found = recorded(lambda: model(x).pow(2).mean().backward())
    skipped = [f"layers.{i}" for i, called in enumerate(calls) if not called]
    ran = [f"layers.{i}" for i, called in enumerate(calls) if called]
    if not skipped:
        assert found == {}
    else:
        (dead,) = found[dh.DeadSiteWarning]
        assert f"(Linear, {len(skipped)} module" in dead
        assert all(f"'{path}'" not in dead for path in ran)
        assert all(f"'{path}'" in dead for path in skipped[:3])
        assert (f"and {len(skipped) - 3} more" in dead) == (len(skipped) > 3)
        (no_grad,) = found[dh.NoGradientWarning]  # 4 tensors per adapter
        count = f"{4 * len(skipped)} of the" if ran else "none of the"
        assert f"{count} {4 * len(calls)} trainable tensors" in no_grad
    delta.detach()
    assert_restored(model, before)


def test_the_check_waits_for_a_forward_in_which_the_delta_is_active():
    model = Calls([True, False]).eval()
    delta = dh.attach(model, dh.LoRA(targets=["layers.1"], r=2))
    with delta.disabled():
        assert recorded(lambda: model(torch.randn(2, WIDTH))) == {}
    delta.merge()  # a merged delta has no hook sites: nothing to check
    with torch.no_grad():
        assert recorded(lambda: model(torch.randn(2, WIDTH))) == {}
    delta.unmerge()
    with torch.no_grad():
        found = recorded(lambda: model(torch.randn(2, WIDTH)))
    assert list(found) == [dh.DeadSiteWarning]


def test_a_module_called_before_the_model_call_counts_as_called():
    """``generate()`` of an encoder-decoder runs the encoder before the model: a module that
    runs outside the model call is alive too."""
    model = Calls([False, True])
    dh.attach(model, dh.Adapter(targets=nn.Linear, bottleneck=2))
    model.layers[0](torch.randn(2, WIDTH))
    assert recorded(lambda: model(torch.randn(2, WIDTH))) == {}


def test_each_delta_and_each_copy_is_checked_on_its_own():
    model = ReadsChild()
    dh.attach(model, dh.Adapter(targets=["child"], bottleneck=2), name="a")
    dh.attach(model, dh.Adapter(targets=["used"], bottleneck=2), name="b")
    twin = copy.deepcopy(model)
    for each in (model, twin):
        found = recorded(lambda each=each: each(torch.randn(2, WIDTH)))
        (dead,) = found[dh.DeadSiteWarning]
        assert dead.startswith("delta 'a' ") and "'child'" in dead


# ----------------------------------------------------------------- missing gradients
def test_a_layer_that_passes_no_gradient_cuts_off_every_tensor_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), Detached(), nn.Linear(WIDTH, WIDTH))
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2), freeze_base=False)
    (message,) = recorded(lambda: train_step(model))[dh.NoGradientWarning]
    assert "none of the 2 trainable tensors of delta 'default' received a gradient" in message
    assert "'0.lora_A', '0.lora_B'" in message
    delta.detach()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), Detached(), nn.Linear(WIDTH, WIDTH))
    dh.attach(model, dh.LoRA(targets=["0", "2"], r=2))
    (message,) = recorded(lambda: train_step(model))[dh.NoGradientWarning]
    assert message.startswith("2 of the 4 trainable tensors of delta 'default' received no")


def test_frozen_disabled_and_unrouted_tensors_are_not_missing():
    torch.manual_seed(0)
    model = Calls([True, True])
    a = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2), name="a")
    b = dh.attach(model, dh.LoRA(targets=["layers.1"], r=2), name="b")
    dh.attach(model, dh.LoRA(targets=nn.Linear, r=2), name="c")
    a.state_dict(keep_vars=True)["layers.0.lora_A"].requires_grad_(False)  # frozen by the user
    b.disable()
    with dh.route(model, ["c", None, "c"]):  # a and b: off for every row
        assert recorded(lambda: train_step(model)) == {}
    dh.set_active(model, ["a", "b", "c"])
    assert recorded(lambda: train_step(model)) == {}


class Checkpointed(Calls):
    """Three layers, the middle one recomputed in a nested backward (reentrant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.layers[1], self.layers[0](x), use_reentrant=True)
        return self.layers[2](x)


def test_a_grad_only_backward_is_not_a_partial_backward():
    torch.manual_seed(0)
    model = Calls([True, True])
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2))
    first = next(iter(delta.parameters()))
    loss = model(torch.randn(3, WIDTH)).sum()
    assert recorded(lambda: torch.autograd.grad(loss, [first])) == {}  # writes no .grad
    assert delta._watch.grad_pending
    assert recorded(lambda: train_step(model)) == {}
    assert not delta._watch.grad_pending  # settled: every tensor got its gradient


def test_reentrant_checkpointing_is_not_a_partial_backward():
    torch.manual_seed(0)
    model = Checkpointed([True, True, True])
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2))
    assert recorded(lambda: train_step(model)) == {}  # the nested backward ends first
    assert not delta._watch.grad_pending


def test_a_functional_call_is_checked_on_the_tensors_it_was_given():
    torch.manual_seed(0)
    model = Calls([True, True])
    dh.attach(model, dh.LoRA(targets=nn.Linear, r=2))
    given = {
        name: tensor.detach().clone().requires_grad_()
        for name, tensor in model.named_parameters()
        if ".dh__" in name
    }

    def step() -> None:
        x = torch.randn(3, WIDTH)
        torch.func.functional_call(model, given, (x,)).pow(2).mean().backward()

    assert recorded(step) == {}
    assert all(tensor.grad is not None for tensor in given.values())


# --------------------------------------------------------------------------- detach
def test_detach_leaves_nothing_of_the_checks_settled_or_not():
    for settle in (False, True):
        torch.manual_seed(0)
        model = ReadsChild()
        before = snapshot(model)
        delta = dh.attach(
            model, [dh.Adapter(targets=["child"], bottleneck=2), dh.LoRA(targets=["used"])]
        )
        if settle:
            recorded(lambda model=model: train_step(model))
        delta.detach()
        assert_restored(model, before)
