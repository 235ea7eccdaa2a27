"""ReFT (LoReFT): ``h + Rᵀ(Wh + b − Rh)`` at chosen positions, checked against an independent
reference (torch's own orthogonal parametrization for R, a per-position loop in float64 for the
formula) on plain modules and tiny transformers models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo as dynamo
from memory_limits import growth_limit
from model_checks import assert_outputs_equal, assert_restored, snapshot
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

import deltahooks as dh
from deltahooks.methods.reft import householder_code, rotation

transformers = pytest.importorskip("transformers")
from tiny_models import MODELS  # noqa: E402

# whole layers (tuple outputs for decoders) and one plain Linear (GPT-2: Conv1D) per model
LAYERS = {
    "gpt2": r"re:transformer\.h\.\d+",
    "llama": r"re:model\.layers\.\d+",
    "bert": r"re:bert\.encoder\.layer\.\d+",
    "t5": r"re:(encoder|decoder)\.block\.\d+",
    "opt": r"re:model\.decoder\.layers\.\d+",
    "vit": r"re:vit\.layers\.\d+",
}
LINEARS = {
    "gpt2": "mlp.c_proj",
    "llama": "mlp.down_proj",
    "bert": "output.dense",
    "t5": "DenseReluDense.wo",
    "opt": "fc2",
    "vit": "mlp.fc2",
}


def tiny(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def logits(model, inputs):
    return model(**inputs).logits


# ------------------------------------------------------------------ the reference
def reference_rotation(raw: torch.Tensor) -> torch.Tensor:
    """R (rank × hidden) through torch's own orthogonal parametrization, in float64."""
    hidden, rank = raw.shape
    holder = nn.Linear(rank, hidden, bias=False).double()  # weight: hidden × rank
    orthogonal(holder, orthogonal_map="householder", use_trivialization=False)
    with torch.no_grad():
        holder.parametrizations.weight.original.copy_(raw)
    return holder.weight.detach().T


def chosen_positions(length: int, first: int, last: int) -> list[int]:
    return sorted(set(range(min(first, length))) | set(range(max(length - last, 0), length)))


def reference_output(h, raw, weight, bias, first, last):
    """The formula position by position, in float64; other positions untouched."""
    r = reference_rotation(raw.double())
    w, b = weight.double(), bias.double()
    out = h.clone()
    for t in chosen_positions(h.shape[-2], first, last):
        v = h[..., t, :].double()
        out[..., t, :] = (v + (v @ w.T + b - v @ r.T) @ r).to(h.dtype)
    return out


def add_reference_hooks(model, delta, first, last, prompt_length=None):
    """Hooks on a pristine copy that apply the reference with the delta's values.

    ``prompt_length``: intervene only on positions chosen over the first
    ``prompt_length`` tokens (pyreft's prompt-only rule), else over each call's sequence.
    """
    state = delta.state_dict()
    for path in delta.paths:
        raw, weight, bias = (
            state[f"{path}.{k}"] for k in ("reft_R_householder", "reft_W", "reft_b")
        )

        def hook(module, args, output, raw=raw, weight=weight, bias=bias):
            h = output[0] if isinstance(output, tuple) else output
            if prompt_length is None:
                new = reference_output(h, raw, weight, bias, first, last)
            else:
                new = h.clone()
                if h.shape[-2] > 1:  # the prompt; decoding steps see one token
                    head = reference_output(
                        h[..., :prompt_length, :], raw, weight, bias, first, last
                    )
                    new[..., :prompt_length, :] = head
            return (new, *output[1:]) if isinstance(output, tuple) else new

        model.get_submodule(path).register_forward_hook(hook)


# ------------------------------------------------------------------ the map for R
def test_rotation_is_torchs_householder_map_and_the_code_inverts_it():
    torch.manual_seed(0)
    raw = torch.randn(10, 3, dtype=torch.float64)
    raw.diagonal().copy_(torch.tensor([1.0, -1.0, 1.0]))
    torch.testing.assert_close(rotation(raw), reference_rotation(raw), rtol=0, atol=1e-12)
    q = torch.empty(10, 3, dtype=torch.float64)
    nn.init.orthogonal_(q)
    torch.testing.assert_close(rotation(householder_code(q)), q.T, rtol=0, atol=1e-12)


def test_rotation_has_orthonormal_rows_for_any_stored_values():
    torch.manual_seed(0)
    raw = torch.randn(12, 4) * 5
    raw.diagonal().copy_(torch.tensor([0.3, -0.2, 0.0, 7.0]))  # decayed or odd signs
    r = rotation(raw)
    torch.testing.assert_close(r @ r.T, torch.eye(4), rtol=0, atol=1e-5)
    # a diagonal entry counts by its sign (torch's int() would make 0.3 a zero row)
    fixed = raw.clone()
    fixed.diagonal().copy_(torch.tensor([1.0, -1.0, 1.0, 1.0]))
    torch.testing.assert_close(r, reference_rotation(fixed.double()).float(), rtol=0, atol=1e-5)


def test_initialisations_follow_pyreft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    default = dh.attach(model, dh.ReFT(targets=["0"], rank=8), name="pyreft")
    identity = dh.attach(model, dh.ReFT(targets=["0"], rank=8, init="identity"), name="identity")
    raw, weight, bias = default.state_dict().values()
    r = rotation(raw)
    torch.testing.assert_close(r @ r.T, torch.eye(8), rtol=0, atol=1e-5)
    bound = 64**-0.5  # nn.Linear(64, 8)'s default: weight and bias uniform in ±1/√fan_in
    assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    assert bias.abs().max() <= bound and bias.abs().max() > 0
    raw, weight, bias = identity.state_dict().values()
    assert torch.equal(weight, rotation(raw)) and torch.equal(bias, torch.zeros(8))


# ------------------------------------------------------------------ positions
@pytest.mark.parametrize("positions", ["f2+l3", "f3", "l2", "f1+l1"])
def test_positions_on_a_plain_linear(positions):
    first, last = dh.methods.reft.parse_positions(positions)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).eval()
    delta = dh.attach(model, dh.ReFT(targets=["0"], positions=positions, rank=2))
    state = delta.state_dict()
    raw, weight, bias = state["0.reft_R_householder"], state["0.reft_W"], state["0.reft_b"]
    with torch.no_grad():
        for length in range(1, 10):  # shorter than, equal to and longer than first + last
            x = torch.randn(2, length, 6)
            with delta.disabled():
                base = model(x)
            got = model(x)
            want = reference_output(base, raw, weight, bias, first, last)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            picked = chosen_positions(length, first, last)
            untouched = [t for t in range(length) if t not in picked]
            assert torch.equal(got[:, untouched], base[:, untouched])  # bit for bit
            assert not torch.equal(got[:, picked], base[:, picked])


@pytest.mark.parametrize(
    "positions", ["", "f", "f5+", "+l5", "l5+f5", "f5l5", "F5", "x5", "f0", "f0+l5", "f-1", 5, None]
)
def test_bad_positions_are_refused_with_the_syntax(positions):
    with pytest.raises(dh.SpecError, match=r"'f<n>\+l<n>'"):
        dh.ReFT(targets=["0"], positions=positions)


# ------------------------------------------------------------------ tiny transformers
@pytest.mark.parametrize("kind", ["layers", "linear"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_the_reference_on_tiny_models(name, kind):
    model, inputs = tiny(name)
    pristine = copy.deepcopy(model)
    targets = LAYERS[name] if kind == "layers" else LINEARS[name]
    first, last = (1, 2) if name == "vit" else (2, 2)  # ViT: 5 tokens (CLS + 4 patches)
    delta = dh.attach(model, dh.ReFT(targets=targets, positions=f"f{first}+l{last}", rank=3))
    assert len(delta.paths) >= 2
    add_reference_hooks(pristine, delta, first, last)
    with torch.no_grad():
        got, want = logits(model, inputs), logits(pristine, inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with delta.disabled():
            assert not torch.allclose(logits(model, inputs), got)  # pyreft's start is no identity


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_init_leaves_outputs_unchanged_and_detach_restores(name):
    model, inputs = tiny(name)
    before = snapshot(model)
    with torch.no_grad():
        base = logits(model, inputs)
        delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f2+l2", init="identity"))
        assert_outputs_equal(logits(model, inputs), base)
    delta.detach()
    assert_restored(model, before)


def lm_loss(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_trains_only_the_delta_keeps_r_orthonormal_and_detaches(name):
    model, inputs = tiny(name)
    before = snapshot(model)
    delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f2+l3", rank=4))
    model.train()
    # weight decay too: it shrinks the signs on the diagonal, which must not matter
    optimizer = torch.optim.AdamW(delta.parameters(), lr=0.05, weight_decay=0.1)
    start = {k: v.clone() for k, v in delta.state_dict().items()}
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = lm_loss(model, inputs)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all("dh__default__reft_" in n for n in with_grad), with_grad
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for path in delta.paths:
        raw = delta.state_dict()[f"{path}.reft_R_householder"]
        assert not torch.equal(raw, start[f"{path}.reft_R_householder"])  # R did move
        r = rotation(raw)
        torch.testing.assert_close(r @ r.T, torch.eye(4), rtol=0, atol=1e-5)
    model.eval()
    delta.detach()
    assert_restored(model, before)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_save_then_load_on_a_fresh_model_is_exact(name, tmp_path):
    model, inputs = tiny(name)
    delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f1+l2", rank=2))
    with torch.no_grad():
        for p in delta.parameters():  # values no initialisation would give
            p.add_(torch.randn_like(p) * 0.1)
    delta.save(tmp_path / "reft.safetensors")
    fresh, _ = tiny(name)
    before = snapshot(fresh)
    loaded = dh.load(fresh, tmp_path / "reft.safetensors")
    with torch.no_grad():
        assert_outputs_equal(logits(fresh, inputs), logits(model, inputs))
    loaded.detach()
    assert_restored(fresh, before)


def test_deepcopy_carries_a_working_delta():
    model, inputs = tiny("gpt2")
    dh.attach(model, dh.ReFT(targets=LAYERS["gpt2"]))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert_outputs_equal(logits(twin, inputs), logits(model, inputs))


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(name, reentrant):
    def grads(checkpointing):
        model, inputs = tiny(name)
        delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f2+l2", rank=2))
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        torch.manual_seed(1)  # BERT's dropout: the same masks in both runs
        out = model(**inputs).logits
        out.pow(2).mean().backward()
        return {k: p.grad for k, p in zip(delta.state_dict(), delta.parameters())}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert plain[key].abs().sum() > 0, key
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_compiled_fullgraph_matches_eager_and_trains():
    model, inputs = tiny("llama")
    ids = inputs["input_ids"]
    delta = dh.attach(
        model,
        [
            dh.ReFT(targets=LAYERS["llama"], positions="f2+l2", rank=2),
            dh.ReFT(targets=["re:.*layers\\.0\\.mlp\\.down_proj"], positions="l1", rank=2),
        ],
    )
    model.train()  # tiny Llama has no dropout: train mode is deterministic
    eager = model(ids).logits
    eager.pow(2).mean().backward()
    eager_grads = [p.grad.clone() for p in delta.parameters()]
    for p in delta.parameters():
        p.grad = None
    # fullgraph=True: any graph break is an error
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        out = compiled(ids).logits
        torch.testing.assert_close(out, eager.detach())
        out.pow(2).mean().backward()
        for p, want in zip(delta.parameters(), eager_grads, strict=True):
            torch.testing.assert_close(p.grad, want)
        assert all(g.abs().sum() > 0 for g in eager_grads)
    finally:
        dynamo.reset()


# ------------------------------------------------------------------ generation
def greedy(model, prompt, **kwargs):
    """Four greedy steps with their scores; no end-of-sequence stop, so lengths are fixed."""
    model.generation_config.eos_token_id = None
    out = model.generate(
        prompt,
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_generation_intervenes_on_each_step_as_its_own_sequence(name):
    model, inputs = tiny(name)
    prompt = inputs["input_ids"]
    pristine = copy.deepcopy(model)
    delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f2+l2", rank=2))
    add_reference_hooks(pristine, delta, 2, 2)
    with torch.no_grad():
        tokens, scores = greedy(model, prompt, use_cache=True)
        want_tokens, want_scores = greedy(pristine, prompt, use_cache=True)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompt_only_generation_recipe_matches_pyreft(name):
    """The docstring's recipe: prompt with the delta on, decoding steps with it off."""
    model, inputs = tiny(name)
    prompt = inputs["input_ids"]
    pristine = copy.deepcopy(model)
    delta = dh.attach(model, dh.ReFT(targets=LAYERS[name], positions="f2+l2", rank=2))
    add_reference_hooks(pristine, delta, 2, 2, prompt_length=prompt.shape[1])
    with torch.no_grad():
        first = model(prompt, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        with delta.disabled():
            tokens, scores = greedy(
                model, torch.cat([prompt, token], 1), past_key_values=first.past_key_values
            )
        want_tokens, want_scores = greedy(pristine, prompt, use_cache=False)
    # the recipe's input holds the first new token: it decodes one step further
    assert torch.equal(tokens[:, : want_tokens.shape[1]], want_tokens)
    torch.testing.assert_close(first.logits[:, -1], want_scores[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[:, :3], want_scores[:, 1:], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ plain modules, dtypes
def test_untied_prefix_and_suffix_are_two_named_deltas():
    """pyreft's share_weights=False: separate parameters for the first and last positions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).eval()
    prefix = dh.attach(model, dh.ReFT(targets=["0"], positions="f2", rank=2), name="prefix")
    suffix = dh.attach(model, dh.ReFT(targets=["0"], positions="l2", rank=2), name="suffix")
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        base = nn.functional.linear(x, model[0].weight, model[0].bias)
        values = [list(d.state_dict().values()) for d in (prefix, suffix)]
        want = reference_output(base, *values[0], 2, 0)
        want = reference_output(want, *values[1], 0, 2)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_identity_start_is_exact_and_r_orthonormal(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16)).to(dtype).eval()
    x = torch.randn(2, 9, 16, dtype=dtype)
    with torch.no_grad():
        base = model(x)
        delta = dh.attach(model, dh.ReFT(targets=["0"], rank=4, init="identity"))
        assert_outputs_equal(model(x), base)
        raw = delta.state_dict()["0.reft_R_householder"]
        assert raw.dtype == dtype
        r = rotation(raw)
        torch.testing.assert_close(r @ r.T, torch.eye(4, dtype=r.dtype), rtol=0, atol=1e-6)
        delta.detach()
        delta = dh.attach(model, dh.ReFT(targets=["0"], rank=4))
        assert model(x).dtype == dtype


def test_dropout_acts_in_training_mode_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    delta = dh.attach(model, dh.ReFT(targets=["0"], positions="l1", rank=2, dropout=0.5))
    x = torch.randn(4, 3, 8)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        trained = model(x)
    assert torch.equal(trained[:, :2], evaluated[:, :2])  # untouched positions: no dropout
    assert (trained[:, 2] == 0).any() and not torch.equal(trained[:, 2], evaluated[:, 2])
    del delta


# ------------------------------------------------------------------ bad input
def test_rank_above_the_hidden_size_is_refused_at_attach():
    model, _ = tiny("llama")  # hidden 32
    before = snapshot(model)
    with pytest.raises(dh.SpecError, match=r"rank=33 .*hidden size 32.*rank <= 32"):
        dh.attach(model, dh.ReFT(targets=LAYERS["llama"], rank=33))
    assert_restored(model, before)


def test_an_unknown_width_asks_for_hidden_size():
    class Shift(nn.Module):
        def forward(self, x):
            return x + 1

    model = nn.Sequential(Shift())
    before = snapshot(model)
    with pytest.raises(dh.SpecError, match=r"'0' \(Shift\).*hidden_size"):
        dh.attach(model, dh.ReFT(targets=["0"]))
    assert_restored(model, before)
    delta = dh.attach(model, dh.ReFT(targets=["0"], hidden_size=8, positions="f1", rank=2))
    x = torch.randn(1, 3, 8)
    assert torch.equal(model(x)[:, 1:], x[:, 1:] + 1)
    delta.detach()
    assert_restored(model, before)


def test_a_hidden_size_that_contradicts_the_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 8))
    before = snapshot(model)
    with pytest.raises(dh.SpecError, match=r"hidden_size=16 .* 8 wide"):
        dh.attach(model, dh.ReFT(targets=["0"], hidden_size=16))
    assert_restored(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank=0 must be a positive integer"),
        ({"rank": True}, "rank=True must be a positive integer"),
        ({"dropout": 1.0}, r"dropout=1.0 must be a number in \[0, 1\)"),
        ({"init": "zeros"}, "init='zeros' is unknown"),
        ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(dh.SpecError, match=message):
        dh.ReFT(targets=["0"], **kwargs)


def test_an_output_without_a_sequence_dimension_is_refused_by_name():
    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x).sum(0)

    model = nn.Sequential(Vector())
    dh.attach(model, dh.ReFT(targets=["0"], rank=2))
    with pytest.raises(dh.UnsupportedModuleError, match=r"Vector returned shape \(4,\)"):
        model(torch.randn(3, 4))


class Block(nn.Module):
    """A layer-like module: its width is not a layer kind's, so hidden_size cannot be checked."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return (self.inner(x) + x,)


@pytest.mark.parametrize(
    "key, lie", [("rank", 2**40), ("rank", 0), ("hidden_size", 10**8), ("positions", "f0")]
)
def test_a_file_that_lies_about_its_hyperparameters_is_refused_cheaply(tmp_path, key, lie):
    model = nn.Sequential(Block())
    dh.attach(model, dh.ReFT(targets=["0"], rank=2)).save(tmp_path / "honest.safetensors")
    with safe_open(str(tmp_path / "honest.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    header = json.loads(meta["delta"])
    header["parts"][0]["hyperparameters"][key] = lie
    save_file(tensors, str(tmp_path / "lie.safetensors"), {**meta, "delta": json.dumps(header)})
    dh.detach(model)
    before = snapshot(model)
    with growth_limit(50 * 2**20), pytest.raises(dh.DeltaFileError):
        dh.load(model, tmp_path / "lie.safetensors")
    assert_restored(model, before)
