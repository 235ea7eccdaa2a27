"""deltahooks PromptTuning / PrefixTuning vs PEFT: same model, same prompts, one process.

Why this shape (see lora_vs_peft.py): both sides run alternately (A B, B A, ...) on two
identical copies of one randomly initialised Llama, each figure is the median of
per-round ratios, and both sides hold the *same* prompt embeddings / prefix MLP, so the
script can check that their logits and losses agree before it reports a time.

Figures, for prompt tuning (20 virtual tokens) and prefix tuning (20 tokens, through
an MLP of width 512: deltahooks ``reparameterize=True``, PEFT ``prefix_projection=True``):
  1. forward, eval + no_grad, ours / PEFT (and ours / the frozen base, for reference)
  2. train step (LM loss fwd + bwd + AdamW), ours / PEFT

Usage:
    python benchmarks/prompts_vs_peft.py            # reference workload, ~2 min on 2 cores
    python benchmarks/prompts_vs_peft.py --quick    # tiny smoke run
    python benchmarks/prompts_vs_peft.py --device cuda --dtype bfloat16

The markdown table is also written to ``benchmarks/out/prompts_vs_peft.md``.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch
from _method_vs_peft import (  # benchmarks/ is sys.path[0] when run as a script
    DTYPES,
    MODEL_SHAPES,
    Figure,
    add_shape_flags,
    base_parser,
    build_base,
    dh,
    environment,
    fill_shapes,
    forward_fn,
    make_batch,
    markdown_report,
    max_diff,
    timed_figure,
    timed_phase,
    train_fn,
)
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "prompts_vs_peft.md"

# (reference, --quick); an explicit flag beats both
SHAPES: dict[str, tuple[int, int]] = {
    **MODEL_SHAPES,
    "tokens": (20, 4),
    "mlp": (512, 32),
    "rounds": (7, 2),
    "warmup": (2, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    add_shape_flags(parser, SHAPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    return fill_shapes(parser, parser.parse_args(argv), SHAPES)


@torch.no_grad()
def prompt_pair(base: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """Our prompt tuning and PEFT's on copies of ``base``, with the same prompt."""
    from peft import PromptTuningConfig, get_peft_model

    ours = copy.deepcopy(base)
    delta = dh.attach(ours, dh.PromptTuning(num_tokens=args.tokens, init="vocab"))
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.tokens)
    theirs = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    theirs.prompt_encoder["default"].embedding.weight.copy_(delta.state_dict()["prompt_embeddings"])
    return ours, theirs


@torch.no_grad()
def prefix_pair(base: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """Our prefix tuning (through the MLP) and PEFT's, with the same MLP weights."""
    from peft import PrefixTuningConfig, get_peft_model

    ours = copy.deepcopy(base)
    spec = dh.PrefixTuning(num_tokens=args.tokens, reparameterize=True, hidden=args.mlp)
    state = dh.attach(ours, spec).state_dict()
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.tokens,
        prefix_projection=True,
        encoder_hidden_size=args.mlp,
    )
    theirs = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    encoder = theirs.prompt_encoder["default"]
    encoder.embedding.weight.copy_(state["prefix_embedding"])
    encoder.transform[0].weight.copy_(state["mlp_in"])
    encoder.transform[0].bias.copy_(state["mlp_in_bias"])
    encoder.transform[2].weight.copy_(state["mlp_out"])
    encoder.transform[2].bias.copy_(state["mlp_out_bias"])
    return ours, theirs


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compare(
    title: str,
    pair: tuple[nn.Module, nn.Module],
    base: nn.Module,
    ids: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[list[Figure], list[str]]:
    """Forward and train-step figures of one method, and the checks that both sides agree."""
    ours, theirs = pair
    checks = [
        f"{title}: trainable params ours {trainable_count(ours)}, PEFT {trainable_count(theirs)}"
    ]
    with torch.no_grad():
        ours_logits, peft_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        checks.append(
            f"{title}: logits {tuple(ours_logits.shape)} ours, {tuple(peft_logits.shape)} PEFT; "
            f"max |ours - PEFT| = {max_diff(ours_logits, peft_logits):.3g}"
        )
    forward = timed_phase(
        f"{title} forward",
        {
            "ours": forward_fn(ours, ids),
            "peft": forward_fn(theirs, ids),
            "base": forward_fn(base, ids),
        },
        args,
        device,
    )
    figures = [
        timed_figure(f"{title} forward, ours / PEFT", forward, "ours", "peft", None),
        timed_figure(f"{title} forward, ours / base (no delta)", forward, "ours", "base", None),
    ]
    ours.train()
    theirs.train()
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    train = timed_phase(
        f"{title} train step",
        {
            "ours": train_fn(ours, ids, losses["ours"]),
            "peft": train_fn(theirs, ids, losses["peft"]),
        },
        args,
        device,
    )
    figures.append(timed_figure(f"{title} train step, ours / PEFT", train, "ours", "peft", None))
    steps = len(losses["ours"])
    gap = max(max_diff(a, b) for a, b in zip(losses["ours"], losses["peft"], strict=True))
    checks.append(f"{title}: after {steps} train steps, max |loss ours - PEFT| = {gap:.3g}")
    return figures, checks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft")
    base = build_base(args, device, dtype, extra_positions=args.tokens)
    ids = make_batch(args, device)
    figures, checks = [], []
    for title, make in (("prompt tuning", prompt_pair), ("prefix tuning", prefix_pair)):
        more, said = compare(title, make(base, args), base, ids, args, device)
        figures += more
        checks += said
    workload = f"{args.tokens} virtual tokens; prefix MLP width {args.mlp}"
    lines = environment(args, device, workload)
    text = markdown_report("deltahooks prompt and prefix tuning vs PEFT", lines, figures, checks)
    print("\n" + text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
