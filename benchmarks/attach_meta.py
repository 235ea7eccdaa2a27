"""Attach/detach cost on a 70B-shaped Llama on the ``meta`` device, ours vs PEFT.

Why: attaching must be cheap even for the largest models (no weights are touched,
only hooks and small tensors registered), and detach must be near-instant. Both
libraries adapt every linear layer with LoRA r=16 on their own fresh meta model,
interleaved, median of several rounds.

Usage:
    python benchmarks/attach_meta.py [--layers 80] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def build(layers: int):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def time_ours(layers: int) -> tuple[float, float, int]:
    import deltahooks as dh

    model = build(layers)
    start = time.perf_counter()
    delta = dh.attach(model, dh.LoRA(targets="all-linear", r=16))
    attached = time.perf_counter() - start
    count = len(delta.paths)
    start = time.perf_counter()
    delta.detach()
    return attached, time.perf_counter() - start, count


def time_peft(layers: int) -> float:
    from peft import LoraConfig, get_peft_model

    model = build(layers)
    config = LoraConfig(r=16, target_modules="all-linear")
    start = time.perf_counter()
    get_peft_model(model, config, low_cpu_mem_usage=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    time_ours(2), time_peft(2)  # warm-up: imports, first-call costs
    ours, detach, peft = [], [], []
    for round_ in range(args.rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for side in order:
            if side == 0:
                a, d, count = time_ours(args.layers)
                ours.append(a)
                detach.append(d)
            else:
                peft.append(time_peft(args.layers))
    ratio = statistics.median(o / p for o, p in zip(ours, peft, strict=True))
    print(f"Llama 70B shape, {args.layers} layers on meta, LoRA r=16 on {count} linear layers")
    print(f"  attach ours  median {statistics.median(ours) * 1e3:8.1f} ms")
    print(f"  attach PEFT  median {statistics.median(peft) * 1e3:8.1f} ms")
    print(f"  attach ours / PEFT  {ratio:.3f}  goal <= 0.3  {'PASS' if ratio <= 0.3 else 'FAIL'}")
    worst = max(detach)
    print(
        f"  detach ours  median {statistics.median(detach) * 1e3:8.1f} ms, worst {worst * 1e3:.1f} ms"
        f"  goal <= 100 ms  {'PASS' if worst <= 0.1 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
