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
import sys
import warnings
from pathlib import Path

import _timing as timing  # benchmarks/ is sys.path[0] when run as a script
import torch
from lora_vs_peft import (
    DTYPES,
    Figure,
    device_name,
    forward_fn,
    make_batch,
    markdown_table,
    max_diff,
    timed_figure,
    timed_phase,
    train_fn,
)
from torch import nn

try:
    import deltahooks as dh
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deltahooks as dh

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "prompts_vs_peft.md"

# (reference, --quick); an explicit flag beats both
SHAPES: dict[str, tuple[int, int]] = {
    "hidden": (512, 64),
    "layers": (8, 2),
    "intermediate": (1376, 172),
    "heads": (8, 4),
    "vocab": (32000, 1000),
    "batch": (4, 2),
    "seq": (128, 32),
    "tokens": (20, 4),
    "mlp": (512, 32),
    "rounds": (7, 2),
    "warmup": (2, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    for name, (ref, quick) in SHAPES.items():
        parser.add_argument("--" + name, type=int, default=None, help=f"default {ref} ({quick})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    args = parser.parse_args(argv)
    for name, (ref, quick) in SHAPES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else ref)
    return args


def build_base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised Llama (the shape matters for speed, not the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq + args.tokens),
        use_cache=False,  # forward and train step: no KV cache is returned by either side
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


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
    base = build_base(args, device, dtype)
    ids = make_batch(args, device)
    figures, checks = [], []
    for title, make in (("prompt tuning", prompt_pair), ("prefix tuning", prefix_pair)):
        more, said = compare(title, make(base, args), base, ids, args, device)
        figures += more
        checks += said
    import peft
    import transformers

    lines = [
        f"date: {timing.utc_now()}",
        f"device: {device} - {device_name(device)}; torch threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, deltahooks {dh.__version__} ({timing.git_commit()})",
        f"workload: Llama hidden={args.hidden} layers={args.layers} "
        f"intermediate={args.intermediate} heads={args.heads} vocab={args.vocab}, batch "
        f"{args.batch} x {args.seq} tokens, {args.dtype}; {args.tokens} virtual tokens; "
        f"prefix MLP width {args.mlp}",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; "
        "ratio = median of per-round ratios",
    ]
    table = markdown_table(figures)
    notes = [f"{f.name}: {f.notes}" for f in figures]
    text = "\n".join(
        [
            "# deltahooks prompt and prefix tuning vs PEFT",
            "",
            *(f"- {line}" for line in lines),
            "",
            table,
            "",
            *(f"- {line}" for line in notes + checks),
        ]
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
