"""The method seam: each site kind, driven by small methods defined here as a user would.

Every site must give the intended output, train only the delta, save/load exactly,
merge bit-exactly where the method says how, and detach to the bit-identical model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh
from deltahooks.merging import stored


def scale_output(module, x, y, tensors, writable):
    (gain,) = tensors
    return y * gain


def scale_input(module, x, tensors):
    (gain,) = tensors
    return x * gain


def shift_weight(weight, tensors):
    (shift,) = tensors
    return weight + shift


def merge_shift(module, tensors):
    return {"weight": stored(module, "weight") + tensors["shift"]}


def add_to_kwarg(name, root, args, kwargs, tensors):
    (offset,) = tensors
    return (args[0] + offset, *args[1:]), kwargs


def scale_by_shared(module, x, y, tensors, writable):
    own, common = tensors
    return y * own * common


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class OutputGain(dh.DeltaSpec):
    method = "test_output_gain"

    def make_part(self, path, module, root, *, device=None):
        width = dh.layers.output_width(module)
        gain = torch.ones(width, device=device or module.weight.device)
        if device is None:
            gain.add_(0.5)
        return dh.Part(path, {"gain": gain}, [dh.OutputSite(scale_output, ("gain",))])


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class InputGain(dh.DeltaSpec):
    method = "test_input_gain"

    def make_part(self, path, module, root, *, device=None):
        gain = torch.full((module.in_features,), 2.0, device=device or module.weight.device)
        return dh.Part(path, {"gain": gain}, [dh.InputSite(scale_input, ("gain",))])


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class WeightShift(dh.DeltaSpec):
    method = "test_weight_shift"
    value: float = 0.25

    def make_part(self, path, module, root, *, device=None):
        shift = torch.full_like(module.weight, self.value, device=device or module.weight.device)
        return dh.Part(
            path,
            {"shift": shift},
            [dh.WeightSite(shift_weight, "weight", ("shift",))],
            merge=merge_shift,
        )


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class InputOffset(dh.DeltaSpec):
    """A root-call site: the model is called with ``x + offset``."""

    method = "test_input_offset"
    width: int = 4

    def make_part(self, path, module, root, *, device=None):
        offset = torch.full((self.width,), 1.0, device=device)
        return dh.Part(
            path, {"offset": offset}, [dh.RootCallSite(partial(add_to_kwarg, "x"), ("offset",))]
        )


def add_to_first(root, args, kwargs, tensors):
    (offset,) = tensors
    return (args[0] + offset, *args[1:]), kwargs


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class CalleeOffset(dh.DeltaSpec):
    """A root-call site whose tensor lives on its target and whose hook sits on ``callee``."""

    method = "test_callee_offset"
    callee: str = ""

    def make_part(self, path, module, root, *, device=None):
        offset = torch.full((module.in_features,), 1.0, device=device)
        site = dh.RootCallSite(add_to_first, ("offset",), module=self.callee)
        return dh.Part(path, {"offset": offset}, [site])


def scale_by_product(module, x, y, tensors, writable):
    gain = tensors[0] * tensors[1] if len(tensors) == 2 else tensors[0]
    return y * gain


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class FactoredGain(dh.DeltaSpec):
    """Trains ``gain = a * b`` in two factors; its files store the product only."""

    method = "test_factored_gain"
    factored: bool = True

    def make_part(self, path, module, root, *, device=None):
        width = module.out_features
        if self.factored:
            tensors = {
                "a": torch.full((width,), 2.0, device=device),
                "b": torch.ones(width, device=device),
            }
        else:
            tensors = {"gain": torch.ones(width, device=device)}
        return dh.Part(path, tensors, [dh.OutputSite(scale_by_product, tuple(tensors))])

    def saved(self, tensors):
        if not self.factored:
            return self, tensors
        paths = {key.rpartition(".")[0] for key in tensors}
        folded = {f"{p}.gain": tensors[f"{p}.a"] * tensors[f"{p}.b"] for p in sorted(paths)}
        return FactoredGain(targets=self.targets, factored=False), folded


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class SharedGain(dh.DeltaSpec):
    method = "test_shared_gain"

    def make_shared(self, root, targets, *, device=None):
        return {"common_gain": torch.full((), 3.0, device=device)}

    def make_part(self, path, module, root, *, device=None):
        own = torch.full((module.out_features,), 2.0, device=device)
        return dh.Part(
            path,
            {"gain": own},
            [dh.OutputSite(scale_by_shared, ("gain", "common_gain"))],
        )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def make():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(5, 4)


def round_trip(model, delta, x, tmp_path):
    """Save, load on a fresh model: same outputs; detach both: the original model."""
    path = tmp_path / "d.safetensors"
    delta.save(path)
    fresh, _ = make()
    loaded = dh.load(fresh, path)
    assert_outputs_equal(fresh(x), model(x))
    loaded.detach()


def test_output_site(tmp_path):
    model, x = make()
    before, base = snapshot(model), model(x)
    delta = dh.attach(model, OutputGain(targets=["a"]))
    expected = model.b(model.norm(nn.functional.linear(x, model.a.weight, model.a.bias) * 1.5))
    torch.testing.assert_close(model(x), expected)
    round_trip(model, delta, x, tmp_path)
    with pytest.raises(dh.UnsupportedOperationError, match="test_output_gain on 'a'"):
        model.eval()
        delta.merge()
    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(model(x), base)


def test_hooks_registered_before_the_attach_see_the_deltas_output():
    """transformers installs hidden-state recorders on a model's first forward; a delta
    attached afterwards must still act before them, and detach restores their order."""
    model, x = make()
    seen = []
    first = model.a.register_forward_hook(lambda m, args, y: seen.append(("first", y.clone())))
    second = model.a.register_forward_hook(lambda m, args, y: seen.append(("second", y.clone())))
    order = list(model.a._forward_hooks)
    delta = dh.attach(model, OutputGain(targets=["a"]))
    later = model.a.register_forward_hook(lambda m, args, y: seen.append(("later", y.clone())))
    model(x)
    adapted = nn.functional.linear(x, model.a.weight, model.a.bias) * 1.5
    assert [name for name, _ in seen] == ["first", "second", "later"]
    for _, y in seen:
        torch.testing.assert_close(y, adapted)
    delta.detach()
    later.remove()
    assert list(model.a._forward_hooks) == order
    first.remove()
    second.remove()


def test_input_site_and_gradients_reach_only_the_delta():
    model, x = make()
    before = snapshot(model)
    delta = dh.attach(model, InputGain(targets=["b"]))
    with delta.disabled():
        expected = model.b(model.norm(model.a(x)) * 2)
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["b.dh__default__gain"]
    delta.detach()
    assert_restored(model, before)


def test_weight_site_keeps_the_base_keys_and_order_while_attached(tmp_path):
    model, x = make()
    before = snapshot(model)
    checkpoint = copy.deepcopy(model.state_dict())
    base_keys = list(checkpoint)
    names = [n for n, _ in model.named_parameters()]
    delta = dh.attach(model, WeightShift(targets=["a", "norm"]))
    assert [k for k in model.state_dict() if "dh__" not in k] == base_keys
    assert [n for n, _ in model.named_parameters() if "dh__" not in n] == names
    model.load_state_dict(checkpoint, strict=True)  # a base checkpoint loads as before
    expected_a = nn.functional.linear(x, checkpoint["a.weight"] + 0.25, checkpoint["a.bias"])
    torch.testing.assert_close(model.a(x), expected_a)
    with delta.disabled():
        base = nn.functional.linear(x, checkpoint["a.weight"], checkpoint["a.bias"])
        torch.testing.assert_close(model.a(x), base)
    hooked = model(x)
    round_trip(model, delta, x, tmp_path)
    delta.merge()
    assert_outputs_equal(model(x), hooked)  # fp32: W + s computed once either way
    assert list(model.state_dict()) == list(snapshot(model).keys)
    delta.unmerge()
    assert_outputs_equal(model(x), hooked)
    delta.detach()
    assert_restored(model, before, same_hook_ids=False)
    assert type(model.a) is nn.Linear and type(model.norm) is nn.LayerNorm


@pytest.mark.parametrize("order", ["first-in-first-out", "last-in-first-out"])
def test_two_weight_sites_on_one_weight_detach_in_either_order(order):
    model, x = make()
    before, base = snapshot(model), model(x)
    one = dh.attach(model, WeightShift(targets=["a"], value=0.25), name="one")
    two = dh.attach(model, WeightShift(targets=["a"], value=0.5), name="two")
    expected = nn.functional.linear(x, before.values["a.weight"] + 0.75, before.values["a.bias"])
    torch.testing.assert_close(model.a(x), expected)
    first, second = (one, two) if order == "first-in-first-out" else (two, one)
    first.detach()
    assert list(model.state_dict())[:2] == ["a.weight", "a.bias"]
    assert [n for n, _ in model.a.named_parameters() if "dh__" not in n] == ["weight", "bias"]
    second.detach()
    assert_restored(model, before)
    assert_outputs_equal(model(x), base)


def test_a_users_own_parametrization_keeps_its_keys():
    model, _ = make()
    torch.nn.utils.parametrize.register_parametrization(model.b, "weight", nn.Identity())
    before = snapshot(model)
    delta = dh.attach(model, WeightShift(targets=["b"]))
    # torch's keys and parameter names for the user's own parametrization, as before
    assert [k for k in model.state_dict() if "dh__" not in k] == before.keys
    assert "b.parametrizations.weight.original" in dict(model.named_parameters())
    delta.detach()
    assert_restored(model, before)


def test_root_call_site():
    model, x = make()
    before = snapshot(model)
    delta = dh.attach(model, InputOffset(targets=dh.Paths([""])))
    with delta.disabled():
        shifted = model(x + 1)
    torch.testing.assert_close(model(x), shifted)
    delta.detach()
    assert_restored(model, before)


@pytest.mark.parametrize("callee", ["", "b"])
def test_root_call_site_of_a_part_on_a_submodule(callee, tmp_path):
    """The part's tensor is on its target ("a"); the hook sits on the root or on "b"."""
    model, x = make()
    before = snapshot(model)
    delta = dh.attach(model, CalleeOffset(targets=["a"], callee=callee))
    assert list(delta.state_dict()) == ["a.offset"]
    with delta.disabled():
        want = model(x + 1) if callee == "" else model.b(model.norm(model.a(x)) + 1)
    torch.testing.assert_close(model(x), want)
    round_trip(model, delta, x, tmp_path)
    twin = copy.deepcopy(model)
    assert_outputs_equal(twin(x), model(x))
    delta.detach()
    assert_restored(model, before)


def test_a_spec_chooses_what_its_file_stores(tmp_path):
    """spec.saved(): the file holds the final form, and loading builds that spec."""
    model, x = make()
    delta = dh.attach(model, [FactoredGain(targets=["a", "b"]), OutputGain(targets=["norm"])])
    with torch.no_grad():
        delta.state_dict(keep_vars=True)["b.b"].fill_(3.0)
    assert sorted(delta.state_dict()) == ["a.a", "a.b", "b.a", "b.b", "norm.gain"]
    path = tmp_path / "d.safetensors"
    delta.save(path)
    fresh, _ = make()
    loaded = dh.load(fresh, path)
    assert loaded.specs[0] == FactoredGain(targets=dh.Paths(["a", "b"]), factored=False)
    assert sorted(loaded.state_dict()) == ["a.gain", "b.gain", "norm.gain"]
    assert_outputs_equal(loaded.state_dict()["b.gain"], torch.full((3,), 6.0))
    assert_outputs_equal(fresh(x), model(x))
    assert sorted(delta.state_dict())[:4] == ["a.a", "a.b", "b.a", "b.b"]  # still factored


def test_shared_tensors_are_stored_once(tmp_path):
    model, x = make()
    before = snapshot(model)
    delta = dh.attach(model, SharedGain(targets=["a", "b"]))
    assert sorted(delta.state_dict()) == ["a.gain", "b.gain", "common_gain"]
    assert list(delta.shared) == ["common_gain"]
    with delta.disabled():
        a = model.a(x)
    torch.testing.assert_close(model.a(x), a * 6)
    round_trip(model, delta, x, tmp_path)
    delta.detach()
    assert_restored(model, before)


def test_a_weight_site_survives_deepcopy_and_detaches_on_the_copy():
    model, x = make()
    before = snapshot(model)
    dh.attach(model, WeightShift(targets=["a"]))
    tuned = model(x)
    twin = copy.deepcopy(model)
    assert_outputs_equal(twin(x), tuned)
    dh.detach(twin)
    assert type(twin.a) is nn.Linear and list(twin.state_dict())[:2] == ["a.weight", "a.bias"]
    fresh, _ = make()
    assert_outputs_equal(twin(x), fresh(x))
    # torch's deepcopy shares the Parametrized class, which detaching the copy edits
    assert_outputs_equal(model(x), tuned)
    dh.attach(twin, WeightShift(targets=["a"]), name="again")  # and so does attaching
    assert_outputs_equal(model(x), tuned)
    dh.detach(model)
    assert_restored(model, before)


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class Gate(dh.DeltaSpec):
    """Only a FlagSite: ``dh_test_gate`` reads true on the target while active."""

    method = "test_gate"

    def make_part(self, path, module, root, *, device=None):
        return dh.Part(path, {}, [dh.FlagSite("dh_test_gate", (path,))])


@pytest.mark.parametrize("existing", [False, True])
def test_a_flag_site_follows_the_switch_and_detach_restores_the_attribute(existing):
    model, _x = make()
    if existing:  # an instance value of the user's own is put back, not deleted
        model.a.dh_test_gate = "mine"
    before = snapshot(model)
    delta = dh.attach(model, Gate(targets=["a"]))
    assert bool(model.a.dh_test_gate) and not hasattr(model.b, "dh_test_gate")
    with delta.disabled():
        assert not model.a.dh_test_gate
    twin = copy.deepcopy(model)  # the copy's flag follows the copy's delta
    with dh.deltas(twin)["default"].disabled():
        assert not twin.a.dh_test_gate and model.a.dh_test_gate
    delta.detach()
    assert_restored(model, before)
    assert model.a.__dict__.get("dh_test_gate") == ("mine" if existing else None)


def test_ledger_attributes_undo_newest_first_to_the_first_value():
    from deltahooks.ledger import Ledger

    model = nn.Linear(2, 2)
    model.note = 1
    first, second = Ledger(model, "first"), Ledger(model, "second")
    first.attribute("", "note", 2)
    second.attribute("", "note", 3)
    first.attribute("", "fresh", 4)
    assert (model.note, model.fresh) == (3, 4)
    second.undo()
    first.undo()
    assert model.note == 1 and "fresh" not in model.__dict__


# --------------------------------------------------- every site on a real model
def embed_with_offset(root, args, kwargs, tensors):
    """A root-call site on a transformers model: ids become embeddings plus an offset."""
    (offset,) = tensors
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids") if "input_ids" in kwargs else args[0]
    kwargs["inputs_embeds"] = root.get_input_embeddings()(ids) + offset
    return (), kwargs


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class EmbedOffset(dh.DeltaSpec):
    method = "test_embed_offset"

    def make_part(self, path, module, root, *, device=None):
        width = root.get_input_embeddings().embedding_dim
        offset = torch.zeros(width, **dh.spec.tensor_options(module, device))
        if device is None:
            offset.normal_()
        return dh.Part(path, {"offset": offset}, [dh.RootCallSite(embed_with_offset, ("offset",))])


SITES_ON_LLAMA = {
    "output (tuple outputs of decoder layers)": lambda: OutputGain(
        targets="re:.*\\.mlp\\.down_proj"
    ),
    "output on a decoder layer": lambda: DecoderGain(targets="re:model\\.layers\\.\\d+"),
    "input": lambda: InputGain(targets="down_proj"),
    "weight": lambda: WeightShift(targets=["o_proj", "input_layernorm"], value=0.01),
    "root call": lambda: EmbedOffset(targets=dh.Paths([""])),
}


def scale_hidden(module, x, y, tensors, writable):
    (gain,) = tensors
    return y * gain


@dh.register_method
@dataclass(frozen=True, kw_only=True)
class DecoderGain(dh.DeltaSpec):
    method = "test_decoder_gain"

    def make_part(self, path, module, root, *, device=None):
        width = dh.layers.hidden_width(path, module, root)
        gain = torch.full((width,), 1.0, **dh.spec.tensor_options(module, device))
        if device is None:
            gain.uniform_(0.5, 1.5)
        return dh.Part(path, {"gain": gain}, [dh.OutputSite(scale_hidden, ("gain",))])


def tiny_llama():
    from tiny_models import llama

    torch.manual_seed(0)
    model, inputs = llama()
    return model.eval(), inputs["input_ids"]


@pytest.mark.parametrize("site", list(SITES_ON_LLAMA))
def test_every_site_compiles_without_graph_breaks(site):
    import torch._dynamo as dynamo

    model, ids = tiny_llama()
    delta = dh.attach(model, SITES_ON_LLAMA[site]())
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break raises
    with torch.no_grad():
        eager = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, eager)
        with delta.disabled():
            base = model(ids).logits
            torch.testing.assert_close(compiled(ids).logits, base)
        assert not torch.allclose(base, eager)
    dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("site", list(SITES_ON_LLAMA))
def test_every_site_trains_under_gradient_checkpointing(site, reentrant):
    grads = []
    for checkpointing in (False, True):
        model, ids = tiny_llama()
        delta = dh.attach(model, SITES_ON_LLAMA[site]())
        model.train()
        if checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model(ids).logits.pow(2).mean().backward()
        grads.append({name: p.grad for name, p in delta.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
