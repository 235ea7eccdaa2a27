"""The shape of a row of the benchmark table: a :class:`Method` compared with PEFT's, and the
:class:`Benchmark` (one result file) that groups methods under one heading and workload.

Why rows: every comparison does the same things in the same order (PEFT's model, ours,
the same values on both sides, checks, timings, memory), so a method is only what is its
own: our spec, PEFT's config, how the values cross over, and which measure runs it. The
table itself is :mod:`benchmarks.methods`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import deltahooks as dh

from .harness import DTYPES, SHAPES, build_base, make_batch, print_training_peak, train_fn
from .report import Figure, environment

Result = tuple[list[Figure], list[str]]  # the figures and the check lines of one method
TrainStep = Callable[..., Callable[[], None]]  # (method, side, model, delta, ids, losses)


def adamw_step(
    method: Method,
    side: str,
    model: nn.Module,
    delta: dh.Delta | None,
    ids: torch.Tensor,
    losses: list[torch.Tensor],
) -> Callable[[], None]:
    """One AdamW step without weight decay: decay would pull our Δ to 0 but PEFT's trained
    copies (LN tuning, say) to 0 too, not to the base, so the sides would differ."""
    return train_fn(model, ids, losses, weight_decay=0.0)


def decayed_adamw_step(
    method: Method,
    side: str,
    model: nn.Module,
    delta: dh.Delta | None,
    ids: torch.Tensor,
    losses: list[torch.Tensor],
) -> Callable[[], None]:
    """One AdamW step with torch's default decay (LoRA, where Δ = 0 is the same on both sides)."""
    return train_fn(model, ids, losses)


@dataclass(frozen=True)
class Method:
    """A row: one of our methods against PEFT's.

    ``share(delta, peft_model)`` gives both sides the same values (either way) and returns
    how many tensors it copied; without it ours is loaded from PEFT's saved adapter with
    ``dh.load_peft``. ``tune_ours`` moves our values off the identity before that (a delta
    left at its start would hide a wrong path); ``tune_peft`` does the same to PEFT's.
    """

    name: str  # what --method takes
    label: str  # the start of its figures' names: "IA3 forward, ours / PEFT"
    spec: Callable[[argparse.Namespace], dh.DeltaSpec]  # ours
    peft_config: Callable[[argparse.Namespace], Any]  # PEFT's
    measure: Callable[..., Result]  # (benchmark, method, base, args, argv) -> figures, checks
    share: Callable[[dh.Delta, nn.Module], int] | None = None
    tune_ours: Callable[[dh.Delta, argparse.Namespace], None] | None = None
    tune_peft: Callable[[nn.Module], None] | None = None
    train_step: TrainStep = adamw_step
    train_title: str = "train step (LM loss fwd + bwd + AdamW)"
    peft_reference: bool = True  # the "forward, PEFT / base (reference)" row
    check_unmerge: bool = True  # check the logits once the merged delta is unmerged again
    autocast_adapter_dtype: bool = False  # PEFT's fp32 upcast of its adapters (QLoRA's recipe)

    def attach_ours(self, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
        delta = dh.attach(model, self.spec(args))
        if self.tune_ours is not None:
            self.tune_ours(delta, args)
        return delta

    def attach_peft(self, model: nn.Module, args: argparse.Namespace) -> nn.Module:
        """PEFT's model; its trainable tensors kept in the model dtype (no fp32 upcast), as
        ours, unless the row says otherwise."""
        from peft import get_peft_model

        config = self.peft_config(args)
        peft_model = get_peft_model(
            model, config, autocast_adapter_dtype=self.autocast_adapter_dtype
        )
        if self.tune_peft is not None:
            self.tune_peft(peft_model)
        return peft_model

    def pair(
        self, ours_model: nn.Module, peft_source: nn.Module, args: argparse.Namespace
    ) -> tuple[dh.Delta, nn.Module, int | None]:
        """(our delta, PEFT's model, tensors copied or None) with the same values."""
        peft_model = self.attach_peft(peft_source, args)
        if self.share is None:
            with tempfile.TemporaryDirectory() as directory:
                peft_model.save_pretrained(directory)
                return dh.load_peft(ours_model, directory), peft_model, None
        delta = self.attach_ours(ours_model, args)
        return delta, peft_model, self.share(delta, peft_model)


@contextmanager
def llama_base(args: argparse.Namespace) -> Iterator[nn.Module | None]:
    """The random Llama every method of a benchmark is attached to (copies of it)."""
    yield build_base(args, torch.device(args.device), DTYPES[args.dtype])


@dataclass(frozen=True)
class Benchmark:
    """One result file (``benchmarks/out/<file>.md``): its methods, heading and workload.

    ``setup(args)`` yields the base the measures get (or ``None`` where they load their
    own); ``worker_base(args)`` builds one side's model in a memory worker.
    """

    file: str
    title: str
    methods: tuple[Method, ...]
    workload: Callable[[argparse.Namespace], str]  # the end of the environment's workload line
    shapes: Mapping[str, tuple[int, int]] = field(default_factory=lambda: SHAPES)  # (ref, quick)
    small: Mapping[str, int] | None = None  # shapes of --small, where the file has them
    setup: Callable[[argparse.Namespace], Any] = llama_base  # a context manager
    worker_base: Callable[[argparse.Namespace], nn.Module] = lambda args: build_base(
        args, torch.device(args.device), DTYPES[args.dtype]
    )
    environment: Callable[[argparse.Namespace, torch.device, str], list[str]] = environment


def memory_worker(
    benchmark: Benchmark, method: Method, side: str, args: argparse.Namespace
) -> None:
    """Child process: build one side of one method, train, print its peak as JSON."""
    import peft  # noqa: F401  (same imports on both sides)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = benchmark.worker_base(args)
    delta = None
    if side == "ours":  # the same shapes as in the timed run; values do not change memory
        delta = method.attach_ours(model, args)
    else:
        model = method.attach_peft(model, args)
    model.train()
    step = method.train_step(method, side, model, delta, make_batch(args, device), [])
    print_training_peak(step, device, args.memory_steps)
