"""summary(model): where deltas sit and what they cost, as readable text."""

from __future__ import annotations

from torch import nn

from .attach import deltas
from .ledger import is_reserved


def _tree(rows: list[tuple[str, str]]) -> list[str]:
    """Render dotted paths as an indented tree; single-child chains print as one dotted line."""
    root: dict = {}
    notes: dict[int, str] = {}
    for path, note in rows:
        node = root
        for name in path.split("."):
            node = node.setdefault(name, {})
        notes[id(node)] = note

    lines: list[str] = []

    def render(node: dict, depth: int) -> None:
        for name, child in node.items():
            label = name
            while len(child) == 1 and id(child) not in notes:
                ((more, child),) = child.items()
                label = f"{label}.{more}"
            note = notes.get(id(child))
            lines.append("  " * depth + label + (f"  {note}" if note else ""))
            render(child, depth + 1)

    render(root, 1)
    return lines


def summary(model: nn.Module) -> str:
    """A tree of the modules that carry deltas, the method on each, and parameter counts.

    ``trainable`` counts what a training step can update: parameters with
    ``requires_grad``, except those of merged deltas (a merged delta is part of the
    weights and refuses a training forward until it is unmerged).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
        >>> print(dh.summary(model))  # doctest: +NORMALIZE_WHITESPACE
        delta 'default' (enabled, unmerged)
          0  lora  32 params
        trainable: 32 of 104 parameters (30.769%)
        base: 72 parameters, delta: 32
        >>> _ = model.eval()  # merge needs eval mode
        >>> delta.merge()
        >>> print(dh.summary(model))  # doctest: +NORMALIZE_WHITESPACE
        delta 'default' (enabled, merged)
          0  lora  32 params (merged into the weights)
        trainable: 0 of 104 parameters (0.000%)
        merged: 32 delta parameters folded into the weights (unmerge to train)
        base: 72 parameters, delta: 32
    """
    lines = []
    merged: dict[int, int] = {}  # id -> numel of every parameter of a merged delta
    for name, delta in deltas(model).items():
        state = ("enabled" if delta.enabled else "disabled") + (
            ", merged" if delta.merged else ", unmerged"
        )
        lines.append(f"delta {name!r} ({state})")
        if delta.merged:
            merged.update((id(p), p.numel()) for p in delta.parameters())
        note = " (merged into the weights)" if delta.merged else ""
        rows = []
        for part in delta.parts:
            count = sum(t.numel() for t in part.tensors.values())
            how = f" {part.note}" if part.note else ""
            rows.append((part.path or "<root>", f"{part.method}{how}  {count:,} params{note}"))
        shared = sum(t.numel() for t in delta.shared.values())
        if shared:
            rows.append(("<shared>", f"{shared:,} params shared by all targets{note}"))
        lines.extend(_tree(rows))
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad and id(p) not in merged)
    delta_count = sum(p.numel() for n, p in params if is_reserved(n))
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({share:.3f}%)")
    if merged:
        lines.append(
            f"merged: {sum(merged.values()):,} delta parameters folded into the weights "
            "(unmerge to train)"
        )
    lines.append(f"base: {total - delta_count:,} parameters, delta: {delta_count:,}")
    return "\n".join(lines)
