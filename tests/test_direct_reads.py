"""Layers whose weight the model reads without calling them: every additive method acts
through a weight site there (Mamba's conv1d/dt_proj, torch's MultiheadAttention and the
TransformerEncoder fast path), while hook-based LoRA stays where layers are called."""

from __future__ import annotations

import copy

import pytest
import torch
from method_bar import (
    check_identity_training_files_and_detach,
    check_merge,
    check_refused,
    evaluate,
    loss,
    perturb,
    seeded,
)
from torch import nn
from torch.nn.utils import parametrize

import deltahooks as dh
from deltahooks.direct_reads import WHY, class_reads, direct_reads

transformers = pytest.importorskip("transformers")

from tiny_models import MODELS  # noqa: E402  (after the importorskip)

D_MODEL, FEEDFORWARD = 64, 128


def mamba():
    config = transformers.MambaConfig(
        hidden_size=32,
        intermediate_size=64,
        state_size=4,
        time_step_rank=8,
        num_hidden_layers=2,
        vocab_size=97,
    )
    return transformers.MambaForCausalLM(config), {"input_ids": torch.randint(0, 97, (2, 7))}


def encoder():
    """One torch encoder layer, batch first, so eval under no_grad takes the fast path."""
    layer = nn.TransformerEncoderLayer(D_MODEL, 4, FEEDFORWARD, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    return model, {"src": torch.randn(2, 5, D_MODEL)}


class Attention(nn.Module):
    """nn.MultiheadAttention alone, self-attention, returning its output tensor."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim, dropout=0.0)
        self.kdim = kdim

    def forward(self, x, memory=None):
        memory = x if memory is None else memory
        return self.attn(x, memory, memory, need_weights=False)[0]


def attention():
    return Attention(), {"x": torch.randn(5, 2, 16)}


def attention_separate_projections():
    return Attention(kdim=12), {"x": torch.randn(5, 2, 16), "memory": torch.randn(4, 2, 12)}


MAKERS = {
    "mamba": mamba,
    "encoder": encoder,
    "attention": attention,
    "attention_kdim": attention_separate_projections,
}

CASES = [
    ("mamba", dh.LoRA(targets="all-linear", r=4)),
    ("mamba", dh.LoRA(targets="all-linear", r=4, dora=True)),
    ("mamba", dh.LoRA(targets="all-linear", r=4, rslora=True, init="gaussian")),
    ("mamba", dh.AdaLoRA(targets="all-linear", init_r=4, target_r=2, total_step=10)),
    ("mamba", dh.IA3(targets="all-linear")),
    ("mamba", dh.IA3(targets="all-linear", feedforward=["x_proj", "out_proj"])),
    ("mamba", dh.IA3(targets=["conv1d", "dt_proj"], feedforward=["conv1d"])),
    ("mamba", dh.VeRA(targets="all-linear", r=4)),
    ("mamba", dh.BitFit()),
    ("encoder", dh.LoRA(targets="all-linear", r=4)),
    ("encoder", dh.LoRA(targets=["out_proj"], r=4)),
    ("encoder", dh.LoRA(targets=["self_attn", "linear1", "linear2"], r=4)),
    ("encoder", dh.LoRA(targets="all-linear", r=4, dora=True)),
    ("encoder", dh.AdaLoRA(targets="all-linear", init_r=4, target_r=2, total_step=10)),
    ("encoder", dh.IA3(targets=["out_proj", "linear1", "linear2"], feedforward=["linear2"])),
    ("encoder", dh.VeRA(targets="all-linear", r=4)),
    ("encoder", dh.BitFit()),
    ("encoder", dh.BitFit(targets=["self_attn", "out_proj"])),
    # weight-site methods everywhere: they act on these layers as they are
    ("mamba", dh.LoHa(targets=["dt_proj", "out_proj"], r=2)),
    ("encoder", dh.LoKr(targets=["out_proj", "linear1"], r=2)),
    ("encoder", dh.OFT(targets=["out_proj", "linear1"], block_size=4)),
    ("encoder", dh.BOFT(targets=["out_proj", "linear1"], block_size=4)),
    ("attention", dh.LoRA(targets=nn.MultiheadAttention, r=4)),
    ("attention", dh.LoRA(targets=["out_proj"], r=4)),
    ("attention", dh.BitFit()),
    ("attention", dh.BitFit(targets=["attn.in_proj_bias"])),
    ("attention_kdim", dh.LoRA(targets=nn.MultiheadAttention, r=4)),
]
IDS = [f"{name}-{type(spec).__name__}-{i}" for i, (name, spec) in enumerate(CASES)]


def fast_path_calls(model, inputs) -> int:
    """How often the encoder's fused eval kernel ran for one no-grad eval forward."""
    calls = []
    original = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch._transformer_encoder_layer_fwd = counting
    try:
        evaluate(model, inputs)
    finally:
        torch._transformer_encoder_layer_fwd = original
    return len(calls)


# ------------------------------------------------------------------ the detector
def test_reads_are_found_where_layers_are_not_called():
    model, _ = mamba()
    mixer = "backbone.layers.0.mixer"
    assert direct_reads(model, f"{mixer}.dt_proj") == {"weight", "bias"}
    assert direct_reads(model, f"{mixer}.conv1d") == {"weight", "bias"}
    assert direct_reads(model, f"{mixer}.in_proj") == frozenset()  # only ever called
    assert direct_reads(nn.MultiheadAttention(8, 2), "out_proj") == {"weight", "bias"}
    model, _ = encoder()
    for child in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
        assert direct_reads(model, f"layers.0.{child}") == {"weight", "bias"}, child


def test_metadata_reads_do_not_count():
    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

        def forward(self, x):
            if isinstance(self.proj.weight, torch.Tensor) and self.proj.bias is not None:
                x = x.to(self.proj.weight.dtype).to(self.proj.weight.device)
            return self.helper(self.proj(x))

        def helper(self, x):
            return x @ self.other.weight.T

    assert class_reads(Reader) == {("other", "weight")}
    model = Reader()
    assert direct_reads(model, "proj") == frozenset()
    assert direct_reads(model, "other") == {"weight"}


def test_a_class_without_source_reads_nothing():
    namespace: dict = {}
    code = "import torch\nclass Made(torch.nn.Module):\n    def forward(self, x):\n"
    exec(code + "        return x @ self.lin.weight\n", namespace)
    assert class_reads(namespace["Made"]) == frozenset()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "opt", "vit"])
def test_no_layer_of_common_models_is_flagged(name):
    model, _ = MODELS[name]()
    flagged = [path for path, _ in model.named_modules() if direct_reads(model, path)]
    assert flagged == []


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_lora_all_linear_keeps_hooks_on_called_layers(name):
    model, _ = seeded(MODELS[name])
    delta = dh.attach(model, dh.LoRA(targets="all-linear", r=2))
    assert delta.parts and all(part.note == "" for part in delta.parts)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert WHY not in dh.summary(model)


# --------------------------------------------------------- every method acts there
def part_effects(model, inputs, delta) -> dict[str, float]:
    """For each part: how far the output moves when only that part's tensors are
    randomised (noise of std 3: dt_proj reaches the logits damped by softplus),
    the other parts left at their start."""
    effects = {}
    with delta.disabled():
        base = evaluate(model, inputs)
    for part in delta.parts:
        saved = {key: tensor.detach().clone() for key, tensor in part.tensors.items()}
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for tensor in part.tensors.values():
                if tensor.is_floating_point() and tensor.requires_grad:
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * 3)
        moved = (evaluate(model, inputs) - base).abs().max().item()
        effects[part.target] = moved
        with torch.no_grad():
            for key, tensor in part.tensors.items():
                tensor.copy_(saved[key])
    return effects


@pytest.mark.parametrize("name, spec", CASES, ids=IDS)
def test_every_part_has_an_effect(name, spec):
    model, inputs = seeded(MAKERS[name])
    delta = dh.attach(model, spec)
    if name == "encoder":
        assert fast_path_calls(model, inputs) == 1  # the fused kernel runs in these checks
    effects = part_effects(model, inputs, delta)
    dead = {target: value for target, value in effects.items() if not value > 1e-4}
    assert not dead, dead


@pytest.mark.parametrize("name, spec", CASES, ids=IDS)
def test_every_trainable_tensor_gets_a_gradient(name, spec):
    model, inputs = seeded(MAKERS[name])
    model.train()
    delta = dh.attach(model, spec)
    perturb(delta)  # away from zero starts, which block a factor's first gradient
    loss(model, inputs).backward()
    missing = [
        key
        for key, tensor in delta.state_dict(keep_vars=True).items()
        if tensor.requires_grad and (tensor.grad is None or not tensor.grad.abs().sum() > 0)
    ]
    assert not missing, missing


@pytest.mark.parametrize("name, spec", CASES, ids=IDS)
def test_merge_matches_the_unmerged_outputs(name, spec):
    check_merge(MAKERS[name], spec)


@pytest.mark.parametrize("name, spec", CASES, ids=IDS)
def test_training_files_and_exact_detach(name, spec, tmp_path):
    every = isinstance(spec, (dh.IA3, dh.BitFit))
    check_identity_training_files_and_detach(MAKERS[name], spec, tmp_path, every_grad=every)


def test_summary_says_which_parts_act_through_the_weight():
    model, _ = seeded(mamba)
    dh.attach(model, dh.LoRA(targets="all-linear", r=4))
    text = dh.summary(model)
    assert f"dt_proj  lora {WHY}" in text
    assert "in_proj  lora  " in text  # called, and never read directly: a hook


# ---------------------------------------------------------------------- BitFit
def test_bitfit_default_trains_every_bias_of_a_transformer_encoder():
    model, inputs = seeded(encoder)
    biases = sum(p.numel() for n, p in model.named_parameters() if "bias" in n)
    assert biases == 576
    delta = dh.attach(model, dh.BitFit())
    assert sum(p.numel() for p in delta.parameters()) == 576
    model.train()
    loss(model, inputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())


def test_bitfit_default_trains_on_mamba():
    model, inputs = seeded(mamba)
    delta = dh.attach(model, dh.BitFit())
    assert any(".dt_proj" in path for path in delta.paths)
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    model.train()
    first = loss(model, inputs)
    first.backward()
    optimizer.step()
    assert loss(model, inputs).item() != first.item()


def test_bitfit_skips_a_bias_tied_to_a_layer_inside_its_module():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(4, 3)
            self.bias = self.decoder.bias  # BERT's LM head ties its bias this way

        def forward(self, x):
            return self.decoder(x)

    model = Head()
    delta = dh.attach(model, dh.BitFit())
    assert delta.paths == ["decoder"]


def test_bitfit_on_a_custom_bias_parameter_acts_and_merges():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x + self.bias

    def make():
        return nn.Sequential(nn.Linear(4, 4), Shift()), {"input": torch.randn(3, 4)}

    model, inputs = seeded(make)
    delta = dh.attach(model, dh.BitFit(targets=["1"]))
    assert list(delta.state_dict()) == ["1.bias.bitfit_bias"]
    assert part_effects(model, inputs, delta)["1"] > 1e-4
    check_merge(make, dh.BitFit())


# ----------------------------------------------------------------------- refusals
def test_bitfit_refuses_a_new_bias_on_a_layer_read_without_a_call():
    model, _ = seeded(mamba)
    check_refused(model, dh.BitFit(targets=["x_proj"]), dh.UnsupportedModuleError, "exclude it")


def test_pissa_refused_on_a_layer_read_without_a_call():
    model, _ = seeded(mamba)
    spec = dh.LoRA(targets=["dt_proj"], r=2, init="pissa")
    check_refused(model, spec, dh.UnsupportedModuleError, "reads its weight directly")


def test_dora_refused_on_multihead_attention():
    model, _ = seeded(attention)
    spec = dh.LoRA(targets=nn.MultiheadAttention, r=2, dora=True)
    check_refused(model, spec, dh.UnsupportedModuleError, "separate dh.LoRA spec")


def test_dropout_on_a_layer_read_without_a_call_warns():
    model, _ = seeded(mamba)
    with pytest.warns(dh.DeltaWarning, match="dropout=0.1 does not apply"):
        dh.attach(model, dh.LoRA(targets=["dt_proj"], r=2, dropout=0.1))


def test_lora_on_multihead_attention_equals_updated_projections():
    model, inputs = seeded(attention)
    reference = copy.deepcopy(model)
    delta = dh.attach(model, dh.LoRA(targets=nn.MultiheadAttention, r=4, alpha=8))
    perturb(delta)
    state = delta.state_dict()
    with torch.no_grad():
        attn = reference.attn
        attn.in_proj_weight += 2 * state["attn.lora_B"] @ state["attn.lora_A"]
        attn.out_proj.weight += 2 * state["attn.out_proj.lora_B"] @ state["attn.out_proj.lora_A"]
    torch.testing.assert_close(evaluate(model, inputs), evaluate(reference, inputs))


# ------------------------------------------------------------- PEFT's MHA layout
def test_lora_on_multihead_attention_exports_in_peft_layout(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = seeded(attention)
    fresh = copy.deepcopy(model)
    delta = dh.attach(model, dh.LoRA(targets=nn.MultiheadAttention, r=4))
    perturb(delta)
    with pytest.warns(dh.DeltaWarning, match="huggingface/peft#3774"):
        delta.save_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)  # no missing/unexpected keys
    layer = loaded.base_model.model.attn
    state = delta.state_dict()
    mine = {
        "in": 2 * state["attn.lora_B"] @ state["attn.lora_A"],
        "out": 2 * state["attn.out_proj.lora_B"] @ state["attn.out_proj.lora_A"],
    }
    torch.testing.assert_close(layer.get_delta_weight("default"), mine["in"])
    out = layer.get_base_layer().out_proj.get_delta_weight("default")
    torch.testing.assert_close(out, mine["out"])


def test_lora_on_multihead_attention_imports_from_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = seeded(attention)
    fresh, reference = copy.deepcopy(model), copy.deepcopy(model)
    config = peft.LoraConfig(target_modules=["attn"], r=4, lora_alpha=8, init_lora_weights=False)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(tmp_path)
    with pytest.warns(dh.DeltaWarning, match="huggingface/peft#3774"):
        delta = dh.load_peft(fresh, tmp_path)
    assert sorted(delta.state_dict()) == sorted(
        ["attn.lora_A", "attn.lora_B", "attn.out_proj.lora_A", "attn.out_proj.lora_B"]
    )
    layer = adapted.base_model.model.attn
    with torch.no_grad():  # W + ΔW once, on both projections
        reference.attn.in_proj_weight += layer.get_delta_weight("default")
        out_proj = layer.get_base_layer().out_proj
        reference.attn.out_proj.weight += out_proj.get_delta_weight("default")
    torch.testing.assert_close(evaluate(fresh, inputs), evaluate(reference, inputs))


def test_separate_projections_have_no_peft_form(tmp_path):
    model, _ = seeded(attention_separate_projections)
    delta = dh.attach(model, dh.LoRA(targets=nn.MultiheadAttention, r=4))
    with pytest.raises(dh.UnsupportedOperationError, match="separate query/key/value"):
        delta.save_peft(tmp_path)
