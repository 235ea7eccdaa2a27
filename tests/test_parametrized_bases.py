"""Bases that carry their own parametrizations: torch's weight_norm and spectral_norm, a user's
``register_parametrization``. A delta stacks on top, trains only its own tensors, saves and
loads, and ``detach()`` leaves the parametrization exactly as it was: the same
``ParametrizationList``, the same original Parameters, keys and flags. What cannot be done
(merging into such a weight, PiSSA/OLoRA, Full, pickling it) raises before anything changes.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_checks import Snapshot, assert_restored, snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import deltahooks as dh
from deltahooks.ledger import is_reserved


class Softclip(nn.Module):
    """A user's own parametrization (no right_inverse): ``W ↦ 2 tanh(W / 2)``."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * torch.tanh(weight / 2)


def add_parametrization(layer: nn.Module, how: str) -> nn.Module:
    if how == "weight_norm":
        return weight_norm(layer)
    if how == "spectral_norm":
        return spectral_norm(layer)
    parametrize.register_parametrization(layer, "weight", Softclip())
    return layer


PARAMETRIZATIONS = {
    "weight_norm": "_WeightNorm",
    "spectral_norm": "_SpectralNorm",
    "custom": "Softclip",
}


def build(kind: str, how: str, width: int, seed: int) -> nn.Module:
    """``layer 0`` (parametrized), Tanh, ``layer 2`` (plain), in eval mode."""
    torch.manual_seed(seed)
    if kind == "linear":
        layers = [nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 4)]
    else:
        layers = [nn.Conv1d(width, 8, 3, padding=1), nn.Tanh(), nn.Conv1d(8, 4, 3, padding=1)]
    add_parametrization(layers[0], how)
    return nn.Sequential(*layers).eval()


def inputs(kind: str, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (3, width) if kind == "linear" else (2, width, 5)
    return torch.randn(*shape, generator=generator)


# method: (spec from init, layer kinds it adapts, merge writes layer 0's weight)
METHODS = {
    "lora": (lambda init: dh.LoRA(targets=["0", "2"], r=2, init=init), ("linear", "conv"), True),
    "dora": (
        lambda init: dh.LoRA(targets=["0", "2"], r=2, init=init, dora=True),
        ("linear", "conv"),
        True,
    ),
    "lora_parameters": (
        lambda init: dh.LoRA(targets=["0.weight", "2.weight"], r=2, init=init),
        ("linear",),
        True,
    ),
    "loha": (lambda init: dh.LoHa(targets=["0", "2"], r=2, init=init), ("linear", "conv"), True),
    "lokr": (lambda init: dh.LoKr(targets=["0", "2"], r=2, init=init), ("linear",), True),
    "oft": (
        lambda init: dh.OFT(targets=["0", "2"], block_size=2, init=init),
        ("linear", "conv"),
        True,
    ),
    "boft": (
        lambda init: dh.BOFT(targets=["0", "2"], block_size=2, init=init),
        ("linear", "conv"),
        True,
    ),
    "ia3": (
        lambda init: dh.IA3(targets=["0", "2"], feedforward=["2"], init=init),
        ("linear", "conv"),
        True,
    ),
    "vera": (lambda init: dh.VeRA(targets=["0", "2"], r=2, init=init), ("linear",), True),
    "adalora": (
        lambda init: dh.AdaLoRA(targets=["0", "2"], total_step=10, init_r=2, target_r=1, init=init),
        ("linear",),
        True,
    ),
    "bitfit": (lambda init: dh.BitFit(targets=["0", "2"]), ("linear", "conv"), False),
}


def chain_of(model: nn.Module):
    chain = model[0].parametrizations.weight
    return chain, list(chain), dict(chain._parameters), chain.unsafe


def assert_chain_kept(model: nn.Module, kept, *, attached: bool = False) -> None:
    """The model's own parametrization is the same object with the same functions first
    (a delta's weight site may follow them while attached) and the same originals."""
    chain, functions, originals, unsafe = kept
    assert model[0].parametrizations.weight is chain, "a different ParametrizationList"
    now = list(chain)[: len(functions)] if attached else list(chain)
    assert len(now) == len(functions) and all(a is b for a, b in zip(now, functions))
    assert list(chain._parameters) == list(originals)
    assert all(chain._parameters[k] is v for k, v in originals.items())
    if not attached:
        assert chain.unsafe is unsafe


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters(remove_duplicate=False)
        if not is_reserved(name)
    }


def with_values_of(before: Snapshot, model: nn.Module, keys: list[str]) -> Snapshot:
    """``before`` with the values of ``keys`` taken from ``model`` now (spectral_norm's power
    iteration updates its own buffers in train mode, with or without a delta)."""
    state = model.state_dict()
    values = {**before.values, **{k: state[k].detach().clone() for k in keys}}
    return dataclasses.replace(before, values=values)


@pytest.mark.parametrize("how", sorted(PARAMETRIZATIONS))
@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=max(settings().max_examples // 5, 4))  # x 30 method/parametrization pairs
@given(
    kind=st.sampled_from(["linear", "conv"]),
    width=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
    random_init=st.booleans(),
)
def test_a_delta_stacks_on_the_base_parametrization_and_detaches_exactly(
    method, how, kind, width, seed, random_init, tmp_path_factory
):
    make, kinds, writes_weight = METHODS[method]
    if kind not in kinds:
        kind = "linear"
    init = "random" if random_init else "default"
    model = build(kind, how, width, seed)
    x = inputs(kind, width)
    kept = chain_of(model)
    before = snapshot(model)
    with torch.no_grad():
        base = model(x)

    # the same delta on a plain copy whose weight is the parametrization's value: the
    # parametrized model must compute exactly what that computes
    plain = build(kind, how, width, seed)  # not a deep copy: torch's would share its class
    parametrize.remove_parametrizations(plain[0], "weight", leave_parametrized=True)
    delta = dh.attach(model, make(init))
    reference = dh.attach(plain, make(init))
    reference.load_state_dict(delta.state_dict())
    with torch.no_grad():
        tuned, expected = model(x), plain(x)
    torch.testing.assert_close(tuned, expected, rtol=1e-5, atol=1e-6)
    if init == "default":  # the method starts at identity: the output is the base's
        torch.testing.assert_close(tuned, base, rtol=1e-5, atol=1e-6)
    elif method != "bitfit":
        assert not torch.allclose(tuned, base, rtol=1e-4, atol=1e-5), "the delta has no effect"

    # merge: refused for the model's own parametrized weight, before anything changes
    if writes_weight:
        with pytest.raises(dh.UnsupportedOperationError, match=PARAMETRIZATIONS[how]):
            delta.merge()
        assert not delta.merged
        with torch.no_grad():
            assert torch.equal(model(x), tuned)
    else:
        delta.merge()
        with torch.no_grad():
            torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-6)
        delta.unmerge()
        with torch.no_grad():
            assert torch.equal(model(x), tuned)
    assert_chain_kept(model, kept, attached=True)

    # a training step changes only the delta's tensors
    model.train()
    frozen = base_parameters(model)
    trained = {k: v.detach().clone() for k, v in delta.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if not is_reserved(n))
    for name, value in base_parameters(model).items():
        assert torch.equal(value, frozen[name]), f"{name} changed in training"
    assert any(not torch.equal(v, trained[k]) for k, v in delta.state_dict().items())
    model.eval()

    # save -> a fresh parametrized model with the same base -> load: the same outputs
    path = tmp_path_factory.mktemp("delta") / "delta.safetensors"
    delta.save(path)
    fresh = build(kind, how, width, seed)
    base_state = {k: v for k, v in model.state_dict().items() if not is_reserved(k)}
    fresh.load_state_dict(base_state)  # spectral_norm's buffers moved in train mode
    dh.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    delta.detach()
    moved = [k for k in base_state if k.endswith(("._u", "._v"))]
    assert_restored(model, with_values_of(before, model, moved))
    assert_chain_kept(model, kept)
    if not moved:
        with torch.no_grad():
            assert torch.equal(model(x), base)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_attaching_in_train_mode_does_not_step_spectral_norm(method):
    """A method reads the weight while it is planned (its shape, DoRA's norm); in train
    mode spectral_norm would step its power iteration on each read, moving its buffers."""
    make = METHODS[method][0]
    model = build("linear", "spectral_norm", 8, 0).train()
    before = snapshot(model)
    dh.attach(model, make("default")).detach()
    assert_restored(model, before)
    assert model[0].parametrizations.weight[0].training


@pytest.mark.parametrize("how", sorted(PARAMETRIZATIONS))
@pytest.mark.parametrize(
    "spec",
    [
        dh.LoRA(targets=["0"], r=2, init="pissa"),
        dh.LoRA(targets=["0"], r=2, init="olora"),
        dh.Full(targets=["0"]),
    ],
    ids=["pissa", "olora", "full"],
)
def test_what_cannot_stand_in_for_a_parametrized_weight_is_refused_at_attach(spec, how):
    model = build("linear", how, 8, 0)
    kept = chain_of(model)
    before = snapshot(model)
    with pytest.raises(dh.UnsupportedModuleError, match=r"parametri"):
        dh.attach(model, [dh.LoRA(targets=["2"], r=2), spec])  # all or nothing
    assert dh.deltas(model) == {}
    assert_restored(model, before)
    assert_chain_kept(model, kept)


def test_a_refused_merge_leaves_the_other_parts_unmerged():
    model = build("linear", "weight_norm", 8, 0)
    x = inputs("linear", 8)
    delta = dh.attach(
        model, [dh.LoRA(targets=["2"], r=2, init="random"), dh.LoHa(targets=["0"], init="random")]
    )
    with torch.no_grad():
        tuned = model(x)
    with pytest.raises(dh.UnsupportedOperationError, match=r"'0\.weight'.*_WeightNorm"):
        delta.merge()
    assert not delta.merged
    with torch.no_grad():
        assert torch.equal(model(x), tuned)
    assert torch.equal(model[2].weight, build("linear", "weight_norm", 8, 0)[2].weight)


def test_a_delta_on_a_parametrized_norm_and_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)).eval()
    parametrize.register_parametrization(model[1], "weight", Softclip())
    parametrize.register_parametrization(model[0], "bias", Softclip())
    x = torch.randn(3, 4)
    before = snapshot(model)
    with torch.no_grad():
        base = model(x)
    for spec in (dh.LNTuning(), dh.BitFit()):
        delta = dh.attach(model, spec)
        with torch.no_grad():
            for tensor in delta.parameters():
                tensor.add_(0.1)
            tuned = model(x)
        assert not torch.allclose(tuned, base)
        with pytest.raises(dh.UnsupportedOperationError, match="Softclip"):
            delta.merge()
        delta.detach()
        assert_restored(model, before)
        with torch.no_grad():
            assert torch.equal(model(x), base)


def test_a_delta_on_a_deep_copy_leaves_the_original_and_its_shared_class_alone():
    """torch's deepcopy shares a parametrized module's class between the copies, and
    parametrizing another tensor adds a property to that class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)).eval()
    parametrize.register_parametrization(model[1], "weight", Softclip())
    twin = copy.deepcopy(model)
    assert type(twin[1]) is type(model[1])
    x = torch.randn(2, 4)
    with torch.no_grad():
        base = model(x)
    before, before_twin = snapshot(model), snapshot(twin)
    delta = dh.attach(twin, dh.LNTuning())  # a weight site on the LayerNorm's bias too
    with torch.no_grad():
        for tensor in delta.parameters():
            tensor.add_(0.1)
        assert torch.equal(model(x), base)  # the original reads its bias as before
        assert not torch.allclose(twin(x), base)
    assert_restored(model, before)
    other = dh.attach(model, dh.LoHa(targets=["0"], init="random"))
    third = copy.deepcopy(twin)
    for done in (third, twin):
        dh.detach(done)
        with torch.no_grad():
            assert torch.equal(done(x), base)
    other.detach()
    assert_restored(model, before)
    assert_restored(twin, before_twin)


def test_targets_do_not_reach_into_parametrization_containers():
    model = build("linear", "weight_norm", 8, 0)
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))  # not "0.parametrizations.weight.0"
    assert delta.paths == ["0"]
    assert dh.resolve_targets(model, "0.weight", parameters=True)[0][0] == "0.weight"


# --------------------------------------------------------------------- a real model: wav2vec2
def tiny_wav2vec2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(config).eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_wav2vec2_all_linear_attaches_trains_and_detaches_exactly(dora, tmp_path):
    model = tiny_wav2vec2()
    conv = model.encoder.pos_conv_embed.conv
    assert parametrize.is_parametrized(conv, "weight")  # transformers' weight_norm
    chain = conv.parametrizations.weight
    originals = dict(chain._parameters)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    with torch.no_grad():
        base = model(audio).last_hidden_state

    delta = dh.attach(model, dh.LoRA(targets="all-linear", r=4, dora=dora))
    assert "encoder.pos_conv_embed.conv" not in delta.paths and len(delta.paths) > 4
    with torch.no_grad():
        torch.testing.assert_close(model(audio).last_hidden_state, base, rtol=1e-5, atol=1e-5)
    model.train()
    frozen = base_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(audio).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, value in base_parameters(model).items():
        assert torch.equal(value, frozen[name]), f"{name} changed in training"
    with torch.no_grad():
        tuned = model(audio).last_hidden_state
    assert not torch.allclose(tuned, base, rtol=1e-4, atol=1e-4)

    delta.save(tmp_path / "delta.safetensors")
    fresh = tiny_wav2vec2()
    dh.load(fresh, tmp_path / "delta.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(audio).last_hidden_state, tuned)

    delta.merge()  # no adapted Linear is parametrized: merging is exact to rounding
    with torch.no_grad():
        torch.testing.assert_close(model(audio).last_hidden_state, tuned, rtol=1e-4, atol=1e-5)
    delta.detach()
    assert_restored(model, before)
    assert conv.parametrizations.weight is chain
    assert all(chain._parameters[k] is v for k, v in originals.items())
    with torch.no_grad():
        assert torch.equal(model(audio).last_hidden_state, base)
