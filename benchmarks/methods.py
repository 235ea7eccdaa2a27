"""The table of methods: each row is one of our methods against PEFT's (our spec, PEFT's
config, how both get the same values, what is measured), grouped by the result file it
writes. ``python -m benchmarks --method NAME`` runs rows; a new method is one row here.

Values: both sides carry the *same* non-identity values (a delta left at its start would
hide a wrong path): ours copied into PEFT's, PEFT's copied into ours, or ours loaded from
PEFT's saved adapter (VeRA, AdaLoRA), whichever the two layouts make simplest.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

import deltahooks as dh

from . import measures, qlora
from .harness import DTYPES, MODEL_SHAPES, build_base, train_fn
from .rows import Benchmark, Method, decayed_adamw_step

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS, IA3_FEEDFORWARD = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
PEFT_LLAMA = ["q_proj", "v_proj"]  # PEFT's default targets for Llama
LYCORIS_TARGETS = [*PEFT_LLAMA, "down_proj"]
PARAMETERS = ["o_proj.weight", "down_proj.weight"]  # LoRA on parameters (PEFT target_parameters)
ADALORA_TOTAL_STEP = 10_000  # AdaLoRA's schedule length: the timed steps stay in its budget phase
SMALL = {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 8000, "seq": 64}
PROMPT_SHAPES = {
    **MODEL_SHAPES,
    "tokens": (20, 4),  # virtual tokens
    "mlp": (512, 32),  # prefix tuning's MLP width
    "rounds": (7, 2),
    "warmup": (2, 1),
}


# ------------------------------------------------------------------ shared values
def peft_layers(
    delta: dh.Delta, peft_model: nn.Module
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(PEFT's layer, tensor name, our tensor) for each of our tensors (``lora_A``,
    ``ia3_l``, ``oft_R``, ...): what a ``share`` walks to copy values between the sides."""
    inner = peft_model.base_model.model
    return [
        (inner.get_submodule(part.path), key.rsplit(".", 1)[1], tensor)
        for part in delta.parts
        for key, tensor in part.tensors.items()
    ]


@torch.no_grad()
def into_peft_weights(delta: dh.Delta, peft_model: nn.Module) -> int:
    """Ours into PEFT's ``<name>["default"].weight`` (LoRA and DoRA: the same layouts)."""
    pairs = peft_layers(delta, peft_model)
    for layer, local, tensor in pairs:
        target = getattr(layer, local)["default"].weight  # lora_magnitude_vector too
        target.copy_(tensor.view_as(target))
    return len(pairs)


@torch.no_grad()
def from_peft_weights(delta: dh.Delta, peft_model: nn.Module) -> int:
    """PEFT's ``<name>["default"].weight`` into ours (its random factors, QLoRA)."""
    pairs = peft_layers(delta, peft_model)
    for layer, local, tensor in pairs:
        tensor.copy_(getattr(layer, local)["default"].weight)
    return len(pairs)


@torch.no_grad()
def from_peft_tensors(delta: dh.Delta, peft_model: nn.Module) -> int:
    """PEFT's ``<name>["default"]`` into ours (LoHa, LoKr: the same names and layouts)."""
    pairs = peft_layers(delta, peft_model)
    for layer, local, tensor in pairs:
        tensor.copy_(getattr(layer, local)["default"])
    return len(pairs)


@torch.no_grad()
def ia3_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    pairs = peft_layers(delta, peft_model)
    for layer, _, tensor in pairs:
        target = layer.ia3_l["default"]
        target.copy_(tensor.view_as(target))
    return len(pairs)


@torch.no_grad()
def ln_tuning_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    """PEFT runs a trained copy of each norm: set it to base + our Δ."""
    pairs = peft_layers(delta, peft_model)
    for layer, local, tensor in pairs:
        attr = local.removeprefix("ln_")  # ln_weight -> weight
        base = getattr(layer.base_layer, attr)
        getattr(layer.ln_tuning_layers["default"], attr).copy_(base + tensor)
    return len(pairs)


@torch.no_grad()
def oft_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    pairs = peft_layers(delta, peft_model)
    for layer, local, tensor in pairs:
        if local == "oft_R":
            layer.oft_R["default"].weight.copy_(tensor)
        else:
            getattr(layer, local)["default"].copy_(tensor)
    return len(pairs)


@torch.no_grad()
def parameters_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    """Our ``<module>.weight.lora_A`` is PEFT's ``<module>.lora_A`` (same layouts in 2-D)."""
    modules = dict(peft_model.named_modules())
    copied = 0
    for key, tensor in delta.state_dict().items():
        owner, _, factor = key.rpartition(".")
        wrapper = modules["base_model.model." + owner.rpartition(".")[0]]
        getattr(wrapper, factor)["default"].weight.copy_(tensor)
        copied += 1
    return copied


@torch.no_grad()
def prompt_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    peft_model.prompt_encoder["default"].embedding.weight.copy_(
        delta.state_dict()["prompt_embeddings"]
    )
    return 1


@torch.no_grad()
def prefix_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    """Our prefix embedding and MLP into PEFT's prompt encoder."""
    state = delta.state_dict()
    encoder = peft_model.prompt_encoder["default"]
    encoder.embedding.weight.copy_(state["prefix_embedding"])
    encoder.transform[0].weight.copy_(state["mlp_in"])
    encoder.transform[0].bias.copy_(state["mlp_in_bias"])
    encoder.transform[2].weight.copy_(state["mlp_out"])
    encoder.transform[2].bias.copy_(state["mlp_out_bias"])
    return 5


# ------------------------------------------------------------ values off the start
@torch.no_grad()
def shrink_lora_b(delta: dh.Delta, args: argparse.Namespace) -> None:
    """Keep the random update small next to W, as after real training."""
    for name, tensor in delta.named_parameters():
        if name.endswith("lora_B"):
            tensor.mul_(0.1)


@torch.no_grad()
def shrink_b_and_move_magnitudes(delta: dh.Delta, args: argparse.Namespace) -> None:
    """DoRA: small random B, magnitudes moved off ``‖W + sBA‖``."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    for name, tensor in delta.named_parameters():
        if name.endswith("lora_B"):
            tensor.mul_(0.1)
        elif name.endswith("lora_magnitude_vector"):
            noise = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
            tensor.mul_(noise.to(device=tensor.device, dtype=tensor.dtype))


@torch.no_grad()
def random_norm_deltas(delta: dh.Delta, args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(args.seed + 2)
    for tensor in delta.parameters():
        noise = torch.randn(tensor.shape, generator=generator) * 0.1
        tensor.copy_(noise.to(device=tensor.device, dtype=tensor.dtype))


@torch.no_grad()
def shrink_adalora_lambda(peft_model: nn.Module) -> None:
    """AdaLoRA's random start (every factor standard normal) scaled down in ``Λ``: at full
    size it swamps the attention scores and float rounding alone reorders near-tied triplets."""
    for name, tensor in peft_model.named_parameters():
        if "lora_E" in name:
            tensor.mul_(0.01)


# -------------------------------------------------------------------- configs
def lora(args: argparse.Namespace, **extra) -> dh.LoRA:
    """Both factors random (``init="random"``): a zero B would hide a wrong B path."""
    return dh.LoRA(targets=LINEARS, r=args.rank, alpha=args.alpha, init="random", **extra)


def lora_config(args: argparse.Namespace, **extra):
    from peft import LoraConfig

    extra.setdefault("target_modules", list(LINEARS))
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, **extra)


def boft_config(args: argparse.Namespace):
    from peft import BOFTConfig
    from peft.tuners.boft import layer

    # one butterfly factor: PEFT's path without its CUDA extension, which it would
    # otherwise try (and, without nvcc, fail) to build for every layer
    layer.get_fbd_cuda = lambda: None
    return BOFTConfig(target_modules=PEFT_LLAMA, boft_block_size=4)


def peft_config(name: str, **kwargs) -> Callable[[argparse.Namespace], object]:
    """A factory of PEFT's ``<name>`` config with fixed keyword arguments."""

    def make(args: argparse.Namespace):
        import peft

        return getattr(peft, name)(**kwargs)

    return make


def prompt_config(args: argparse.Namespace):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)


def prefix_config(args: argparse.Namespace):
    """Through the MLP on both sides: ours ``reparameterize=True``, PEFT's ``prefix_projection``."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.tokens,
        prefix_projection=True,
        encoder_hidden_size=args.mlp,
    )


@contextmanager
def prompt_base(args: argparse.Namespace) -> Iterator[nn.Module]:
    """The Llama with room for the virtual tokens in front of the real ones."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    yield build_base(args, device, dtype, extra_positions=args.tokens)


def adalora_step(method, side, model, delta, ids, losses):
    """The AdaLoRA loop: LM loss plus the orthogonality term (PEFT adds it inside its
    forward), backward, AdamW, then the rank allocator's update before zero_grad."""
    allocator = dh.adalora_allocator(delta) if side == "ours" else None
    count = [0]

    def loss(ids: torch.Tensor) -> torch.Tensor:
        value = model(input_ids=ids, labels=ids).loss
        return value if allocator is None else value + allocator.orthogonality_loss()

    def allocate() -> None:
        count[0] += 1
        if allocator is not None:
            allocator.update_and_allocate(count[0])
        else:
            model.base_model.update_and_allocate(count[0])

    return train_fn(model, ids, losses, 0.0, loss_fn=loss, after_step=allocate)


def lora_workload(args: argparse.Namespace) -> str:
    return (
        f"LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} on {','.join(LINEARS)}"
    )


# ---------------------------------------------------------------------- the table
LORA = dict(
    spec=lambda a: lora(a, dropout=a.dropout),
    peft_config=lambda a: lora_config(a, lora_dropout=a.dropout),
    share=into_peft_weights,
    tune_ours=shrink_lora_b,
    train_step=decayed_adamw_step,
)
VERA_ADALORA = dict(  # ours loaded from PEFT's files; AdaLoRA's step runs its allocator
    train_title="train step (fwd + bwd + AdamW)", peft_reference=False, check_unmerge=False
)

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "lora_vs_peft",
        "deltahooks LoRA vs PEFT",
        (Method("lora", "LoRA", measure=measures.lora_with_floor, **LORA),),
        lora_workload,
    ),
    Benchmark(
        "compiled_vs_peft",
        "compiled LoRA train step, deltahooks vs PEFT",
        (Method("compiled", "compiled LoRA", measure=measures.compiled_train_step, **LORA),),
        lora_workload,
    ),
    Benchmark(
        "qlora_vs_peft",
        "deltahooks LoRA vs PEFT QLoRA (NF4 base)",
        (
            Method(
                "qlora",
                "QLoRA",
                spec=lambda a: dh.LoRA(targets=LINEARS, r=a.rank, alpha=a.alpha),
                peft_config=lambda a: lora_config(a, init_lora_weights=False),
                measure=qlora.nf4_lora,
                share=from_peft_weights,
                train_step=decayed_adamw_step,
                autocast_adapter_dtype=True,
            ),
        ),
        lambda a: f"LoRA r={a.rank} alpha={a.alpha:g} on all 7 linears",
        shapes=qlora.SHAPES,
        setup=qlora.checkpoint,
        worker_base=qlora.load_nf4,
        environment=qlora.environment,
    ),
    Benchmark(
        "lora_parameters_vs_peft",
        "deltahooks LoRA on parameters vs PEFT target_parameters",
        (
            Method(
                "lora_parameters",
                "LoRA on parameters",
                spec=lambda a: dh.LoRA(targets=PARAMETERS, r=a.rank, alpha=a.alpha, init="random"),
                peft_config=lambda a: lora_config(
                    a, target_modules=[], target_parameters=PARAMETERS
                ),
                measure=measures.compare_with_peft,
                share=parameters_into_peft,
            ),
        ),
        lambda a: f"LoRA r={a.rank} alpha={a.alpha:g} on {','.join(PARAMETERS)}",
    ),
    Benchmark(
        "dora_vs_peft",
        "deltahooks DoRA vs PEFT",
        (
            Method(
                "dora",
                "DoRA",
                spec=lambda a: lora(a, dora=True),
                peft_config=lambda a: lora_config(a, lora_dropout=0.0, use_dora=True),
                measure=measures.compare_with_peft,
                share=into_peft_weights,
                tune_ours=shrink_b_and_move_magnitudes,
            ),
        ),
        lambda a: f"DoRA r={a.rank} alpha={a.alpha:g} on {','.join(LINEARS)}",
    ),
    Benchmark(
        "ia3_lntuning_vs_peft",
        "deltahooks IA3 and LN tuning vs PEFT",
        (
            Method(
                "ia3",
                "IA3",
                spec=lambda a: dh.IA3(
                    targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, init="random"
                ),
                peft_config=peft_config(
                    "IA3Config",
                    target_modules=IA3_TARGETS,
                    feedforward_modules=IA3_FEEDFORWARD,
                    init_ia3_weights=True,
                ),
                measure=measures.compare_with_peft,
                share=ia3_into_peft,
            ),
            Method(
                "ln_tuning",
                "LN tuning",
                spec=lambda a: dh.LNTuning(),
                peft_config=peft_config("LNTuningConfig"),  # PEFT's Llama default: every norm
                measure=measures.compare_with_peft,
                share=ln_tuning_into_peft,
                tune_ours=random_norm_deltas,
            ),
        ),
        lambda a: (
            f"IA3 on {','.join(IA3_TARGETS)} (feedforward {','.join(IA3_FEEDFORWARD)}); "
            f"LN tuning on every norm ({2 * a.layers + 1} layers)"
        ),
    ),
    Benchmark(
        "loha_lokr_vs_peft",
        "deltahooks LoHa and LoKr vs PEFT",
        tuple(
            Method(
                name,
                label,
                spec=lambda a, s=spec: s(targets=LYCORIS_TARGETS, r=8, alpha=8, init="random"),
                peft_config=peft_config(
                    config, target_modules=LYCORIS_TARGETS, r=8, alpha=8, init_weights=False
                ),
                measure=measures.compare_with_peft,
                share=from_peft_tensors,
            )
            for name, label, spec, config in [
                ("loha", "LoHa", dh.LoHa, "LoHaConfig"),
                ("lokr", "LoKr", dh.LoKr, "LoKrConfig"),
            ]
        ),
        lambda a: f"LoHa and LoKr (r=8, alpha=8) on {','.join(LYCORIS_TARGETS)}",
    ),
    Benchmark(
        "oft_boft_vs_peft",
        "deltahooks OFT and BOFT vs PEFT",
        (
            Method(
                "oft",
                "OFT",
                spec=lambda a: dh.OFT(targets=PEFT_LLAMA, init="random"),
                peft_config=peft_config("OFTConfig", target_modules=PEFT_LLAMA),
                measure=measures.compare_with_peft,
                share=oft_into_peft,
            ),
            Method(
                "boft",
                "BOFT",
                spec=lambda a: dh.BOFT(targets=PEFT_LLAMA, block_size=4, init="random"),
                peft_config=boft_config,
                measure=measures.compare_with_peft,
                share=oft_into_peft,
            ),
        ),
        lambda a: f"{'/'.join(a.labels)} on {','.join(PEFT_LLAMA)}",
    ),
    Benchmark(
        "vera_adalora_vs_peft",
        "deltahooks VeRA and AdaLoRA vs PEFT",
        (
            Method(
                "vera",
                "VeRA",
                spec=lambda a: dh.VeRA(targets=PEFT_LLAMA, r=256, init="random"),
                # init_weights=False: every trained tensor starts away from zero
                peft_config=peft_config(
                    "VeraConfig", target_modules=PEFT_LLAMA, r=256, init_weights=False
                ),
                measure=measures.compare_with_peft,
                **VERA_ADALORA,
            ),
            Method(
                "adalora",
                "AdaLoRA",
                spec=lambda a: dh.AdaLoRA(
                    targets=PEFT_LLAMA,
                    init_r=12,
                    target_r=8,
                    total_step=ADALORA_TOTAL_STEP,
                    alpha=32,
                    init="random",
                ),
                peft_config=peft_config(
                    "AdaLoraConfig",
                    target_modules=PEFT_LLAMA,
                    init_r=12,
                    target_r=8,
                    total_step=ADALORA_TOTAL_STEP,
                    lora_alpha=32,
                    init_lora_weights=False,
                    task_type="CAUSAL_LM",  # so PEFT's forward adds the orthogonality term
                ),
                measure=measures.compare_with_peft,
                tune_peft=shrink_adalora_lambda,
                train_step=adalora_step,
                **VERA_ADALORA,
            ),
        ),
        lambda a: (
            f"on {','.join(PEFT_LLAMA)}: VeRA r=256; AdaLoRA init_r=12 target_r=8 (budget phase)"
        ),
        small=SMALL,
    ),
    Benchmark(
        "prompts_vs_peft",
        "deltahooks prompt and prefix tuning vs PEFT",
        (
            Method(
                "prompt_tuning",
                "prompt tuning",
                spec=lambda a: dh.PromptTuning(num_tokens=a.tokens, init="vocab"),
                peft_config=prompt_config,
                measure=measures.prompt_forward_and_train,
                share=prompt_into_peft,
                train_step=decayed_adamw_step,
            ),
            Method(
                "prefix_tuning",
                "prefix tuning",
                spec=lambda a: dh.PrefixTuning(
                    num_tokens=a.tokens, reparameterize=True, hidden=a.mlp
                ),
                peft_config=prefix_config,
                measure=measures.prompt_forward_and_train,
                share=prefix_into_peft,
                train_step=decayed_adamw_step,
            ),
        ),
        lambda a: f"{a.tokens} virtual tokens; prefix MLP width {a.mlp}",
        shapes=PROMPT_SHAPES,
        setup=prompt_base,
    ),
)
METHODS: dict[str, Method] = {m.name: m for b in BENCHMARKS for m in b.methods}
BENCHMARK_OF: dict[str, Benchmark] = {m.name: b for b in BENCHMARKS for m in b.methods}
