"""Every method on every tiny transformers architecture of ``architectures.py``, with generic
targets ("all-linear", the method's default, the repeated blocks).

Each cell attaches, trains a few steps (only delta tensors change, each of them does, and the
outputs move off the base model's), saves and loads into a fresh model of the same seed
(same outputs), merges (≈ unmerged, where the method merges; a clear refusal where it does
not), generates greedily where the model generates (each cached step's logits equal a plain
``use_cache=False`` forward over the same tokens), and detaches bit-exactly.

A cell may instead refuse at attach only where README.md documents the refusal: the
:data:`REFUSALS` table names the method, the architectures, the error class and the README
phrase it rests on. Such a cell asserts the refusal (so a documented refusal that starts
working fails too, and the table must shrink).
"""

from __future__ import annotations

import functools
import pathlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from architectures import (  # noqa: E402  (after the importorskip)
    ARCHITECTURES,
    build,
    inputs_of,
    main_output,
    repeated_blocks,
)
from model_checks import assert_restored, snapshot  # noqa: E402

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
STEPS = 2
GENERATED = 3

# method name -> the spec on a given model: small sizes, generic targets
SPECS: dict[str, Callable[[torch.nn.Module], dh.DeltaSpec]] = {
    "LoRA": lambda m: dh.LoRA(targets="all-linear", r=4),
    "DoRA": lambda m: dh.LoRA(targets="all-linear", r=4, dora=True),
    "AdaLoRA": lambda m: dh.AdaLoRA(targets="all-linear", init_r=4, target_r=2, total_step=10),
    "VeRA": lambda m: dh.VeRA(targets="all-linear", r=8),
    "LoHa": lambda m: dh.LoHa(targets="all-linear", r=4),
    "LoKr": lambda m: dh.LoKr(targets="all-linear", r=4),
    "OFT": lambda m: dh.OFT(targets="all-linear"),
    "BOFT": lambda m: dh.BOFT(targets="all-linear"),
    "IA3": lambda m: dh.IA3(targets="all-linear"),
    "BitFit": lambda m: dh.BitFit(),
    "LNTuning": lambda m: dh.LNTuning(),
    "Full": lambda m: dh.Full(targets=repeated_blocks(m)),
    "Adapter": lambda m: dh.Adapter(targets=repeated_blocks(m), bottleneck=8),
    "ParallelAdapter": lambda m: dh.ParallelAdapter(targets=repeated_blocks(m), bottleneck=8),
    "LowRankAdapter": lambda m: dh.LowRankAdapter(targets=repeated_blocks(m)),
    "Compacter": lambda m: dh.Compacter(targets=repeated_blocks(m)),
    "PromptTuning": lambda m: dh.PromptTuning(num_tokens=4),
    "PrefixTuning": lambda m: dh.PrefixTuning(num_tokens=4, hidden=16),
    "ReFT": lambda m: dh.ReFT(targets=repeated_blocks(m)),
}

# the methods README's methods tables mark "merge: yes"; the others must refuse merge()
MERGEABLE = {
    "LoRA",
    "DoRA",
    "AdaLoRA",
    "VeRA",
    "LoHa",
    "LoKr",
    "OFT",
    "BOFT",
    "IA3",
    "BitFit",
    "LNTuning",
    "Full",
}


@dataclass(frozen=True)
class Refusal:
    """A cell README documents as refused at attach, or (``at_forward``) at the first forward:
    a layout that only the tensors show (channels first, a stage that merges tokens)."""

    method: str
    architectures: tuple[str, ...]
    error: type[Exception]
    match: str  # a regex the error's message must contain: the documented reason, not another
    readme: str  # the phrase of README.md that documents it
    at_forward: bool = False


BIAS_FREE = (
    "llama",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "mistral",
    "mixtral",
    "qwen3_moe",
    "deepseek_v3",
    "t5",
)
NO_TOKEN_EMBEDDINGS = ("vit", "convnext", "swin", "wav2vec2", "clip")
NO_CACHE = ("distilbert", "vit", "convnext", "swin", "wav2vec2", "clip")
SLIDING_WINDOW_CACHE = ("gemma2", "gemma3", "mistral")

REFUSALS: list[Refusal] = [
    Refusal(
        "BitFit",
        BIAS_FREE,
        dh.TargetError,
        "the biases the model has, and it has none",
        "on bias-free models (Llama, T5) name targets",
    ),
    Refusal(
        "PrefixTuning",
        NO_CACHE,
        dh.UnsupportedModuleError,
        "to take a cache .* and neither forward does",
        "Models without a usable cache are refused at attach.",
    ),
    Refusal(
        "PrefixTuning",
        ("mamba",),  # its cache holds states, not keys and values
        dh.UnsupportedModuleError,
        "state-space layers",
        "Models without a usable cache are refused at attach.",
    ),
    Refusal(
        "PrefixTuning",
        SLIDING_WINDOW_CACHE,
        dh.UnsupportedModuleError,
        "sliding windows",
        "Models without a usable cache are refused at attach.",
    ),
    Refusal(
        "PromptTuning",
        NO_TOKEN_EMBEDDINGS,
        dh.UnsupportedModuleError,
        "get_input_embeddings",
        "A model without token embeddings (`get_input_embeddings()`: ViT, ConvNeXt, Swin, "
        "wav2vec2, CLIP) is refused at attach.",
    ),
    *(
        Refusal(
            method,
            ("convnext",),  # its stages return (N, C, H, W)
            dh.UnsupportedModuleError,
            "channels first",
            "a stage that returns its channels first (ConvNeXt's) is refused at its first call",
            at_forward=True,
        )
        for method in ("Adapter", "ParallelAdapter", "LowRankAdapter", "Compacter", "ReFT")
    ),
    Refusal(
        "ParallelAdapter",
        ("swin",),  # patch merging: (N, 4L, C) in, (N, L, 2C) out
        dh.UnsupportedModuleError,
        "leading dimensions differ",
        "`ParallelAdapter` on a module that changes the number of tokens (a Swin stage merges "
        "patches) is refused at its first call",
        at_forward=True,
    ),
    Refusal(
        "PromptTuning",
        ("whisper",),
        dh.UnsupportedModuleError,
        "takes no embeddings argument",
        "an encoder that takes no `inputs_embeds` (Whisper's) is refused at attach.",
    ),
]


def refusal_for(method: str, arch: str) -> Refusal | None:
    found = [r for r in REFUSALS if r.method == method and arch in r.architectures]
    assert len(found) <= 1, f"two refusals for {method} on {arch}"
    return found[0] if found else None


def test_every_refusal_is_documented_in_the_readme():
    flat = " ".join(README.split())
    for refusal in REFUSALS:
        assert refusal.method in SPECS
        assert set(refusal.architectures) <= set(ARCHITECTURES), refusal
        assert issubclass(refusal.error, dh.DeltaError), refusal
        assert " ".join(refusal.readme.split()) in flat, f"README does not say {refusal.readme!r}"


def test_the_matrix_is_wide_enough():
    kinds = {a.kind for a in ARCHITECTURES.values()}
    assert len(ARCHITECTURES) >= 24
    assert {"decoder", "moe", "ssm", "seq2seq", "encoder", "vision", "audio", "multimodal"} <= kinds
    public = {
        name
        for name in dh.__all__
        if isinstance(getattr(dh, name), type) and issubclass(getattr(dh, name), dh.DeltaSpec)
    } - {"DeltaSpec"}
    assert public <= set(SPECS), f"methods missing from the matrix: {public - set(SPECS)}"


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs)).float()


def train(model, inputs, params) -> None:
    """A few Adam steps on the mean square of the outputs.

    In eval mode: dropout, drop-path (Swin) and layer-drop (BART, Whisper, wav2vec2) would
    otherwise zero a tensor's gradient by chance, and the check that every delta tensor
    trains would flake.
    """
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(STEPS):
        loss = main_output(model(**inputs)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@functools.cache
def unused_modules(arch: str) -> frozenset[str]:
    """Paths of the modules whose parameters get no gradient in the base model: the model
    never uses them (LLaVA's vision ``post_layernorm``), so a delta there cannot train."""
    model = build(arch)
    main_output(model(**inputs_of(arch))).float().pow(2).mean().backward()
    return frozenset(
        path
        for path, module in model.named_modules()
        if list(module.parameters(recurse=False))
        and all(p.grad is None or not p.grad.any() for p in module.parameters(recurse=False))
    )


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol, equal_nan=True)


def check_generation(arch: str, model, inputs) -> None:
    """Greedy generate; each cached step's logits equal a plain forward over the same tokens."""
    how = ARCHITECTURES[arch].generates
    inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=GENERATED,
            min_new_tokens=GENERATED,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert len(out.logits) == GENERATED
    sequences = out.sequences
    for step, cached in enumerate(out.logits):
        if how == "decoder":
            length = inputs["input_ids"].shape[1] + step
            plain_inputs = {**inputs, "input_ids": sequences[:, :length]}
            plain_inputs["attention_mask"] = torch.ones_like(plain_inputs["input_ids"])
        else:
            start = sequences.shape[1] - GENERATED  # the decoder start token(s)
            plain_inputs = {**inputs, "decoder_input_ids": sequences[:, : start + step]}
        with torch.no_grad():
            plain = model(**plain_inputs, use_cache=False).logits[:, -1].float()
        close(cached.float(), plain, atol=1e-5)


@functools.cache
def base_outputs(arch: str) -> torch.Tensor:
    return outputs(build(arch), inputs_of(arch))


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cell(arch, method, tmp_path):
    run_cell(arch, method, tmp_path)


def run_cell(arch: str, method: str, tmp_path) -> None:
    model = build(arch)
    inputs = inputs_of(arch)
    base = outputs(model, inputs)  # transformers sets a flag on the first call: before snapshot
    before = snapshot(model)
    close(base, base_outputs(arch), atol=0)  # the seeded rebuild is the same model
    spec = SPECS[method](model)

    refusal = refusal_for(method, arch)
    if refusal is not None and not refusal.at_forward:
        with pytest.raises(refusal.error, match=refusal.match):
            dh.attach(model, spec)
        assert_restored(model, before)
        return
    if refusal is not None:
        delta = dh.attach(model, spec)
        with pytest.raises(refusal.error, match=refusal.match):
            model(**inputs)
        delta.detach()
        assert_restored(model, before)
        return

    delta = dh.attach(model, spec)
    params = dict(delta.named_parameters())
    assert params, "the delta has no trainable tensors"
    start = {name: p.detach().clone() for name, p in params.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dh.DeltaWarning)
        train(model, inputs, list(params.values()))
    liveness_warnings = " ".join(
        str(w.message)
        for w in caught
        if issubclass(w.category, (dh.DeadSiteWarning, dh.NoGradientWarning))
    )

    # only delta tensors change, every one of them does, and the delta acts
    state = model.state_dict()
    for key in before.keys:
        assert torch.equal(state[key], before.values[key]), f"base tensor {key} changed"
    # a tensor may stay as it was only on a module the model never uses, and deltahooks must
    # then have said so
    unused = unused_modules(arch)
    frozen = [n for n, p in params.items() if torch.equal(p.detach(), start[n])]
    for name in frozen:
        module = name.rpartition(".")[0]
        if module in unused:
            assert module in liveness_warnings, f"no DeadSite/NoGradient warning names {module!r}"
    frozen = [n for n in frozen if n.rpartition(".")[0] not in unused]
    assert not frozen, f"delta tensors that training did not change: {frozen}"
    trained = outputs(model, inputs)
    moved = trained.shape != base.shape or (trained - base).abs().max() > 1e-5 * base.abs().max()
    assert moved, "the trained delta does not change the outputs"

    if ARCHITECTURES[arch].generates:
        check_generation(arch, model, inputs)

    # save -> a fresh model of the same seed -> load: the same outputs
    delta.save(tmp_path / "delta.safetensors")
    fresh = build(arch)
    dh.load(fresh, tmp_path / "delta.safetensors")
    close(outputs(fresh, inputs), trained, atol=1e-6)

    # merge ≈ unmerged where the method merges, a clear refusal where it does not
    if method in MERGEABLE:
        delta.merge()
        close(outputs(model, inputs), trained, atol=1e-4)
        delta.unmerge()
        close(outputs(model, inputs), trained, atol=0)
    else:
        with pytest.raises(dh.UnsupportedOperationError):
            delta.merge()

    delta.detach()
    assert_restored(model, before)
    close(outputs(model, inputs), base, atol=0)
