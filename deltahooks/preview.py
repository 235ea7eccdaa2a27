"""A model's module tree with what target patterns select: a dry run of ``targets=``.

Nothing is attached: the patterns go through :func:`deltahooks.resolve_targets`, the
same resolution ``dh.attach`` uses, so a pattern that matches nothing fails here with
the same error (and the closest module names) as it would at attach.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from .layers import is_linear_like
from .targets import ALL_LINEAR, Target, resolve_targets

MARK = "<- target"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _render(module: nn.Module, path: str, selected: set[str]) -> list[str]:
    """Lines for the children of ``module``, indented by two spaces per level.

    Consecutive numbered siblings whose subtrees print the same (the layers of a stack) are
    shown once, as ``0-N  N+1 x Class``; named modules always print under their own name.
    """
    blocks: list[tuple[str, list[str]]] = []
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        mark = f"  {MARK}" if child_path in selected else ""
        head = f"{type(child).__name__}  {_count(child):,}{mark}"
        body = ["  " + line for line in _render(child, child_path, selected)]
        blocks.append((name, [head, *body]))
    lines: list[str] = []
    start = 0
    while start < len(blocks):
        end = start + 1
        while (
            end < len(blocks)
            and blocks[start][0].isdigit()
            and blocks[end][0].isdigit()
            and blocks[end][1] == blocks[start][1]
        ):
            end += 1
        name, (head, *body) = blocks[start]
        if end - start > 1:
            label = f"{name}-{blocks[end - 1][0]}"
            kind, rest = head.split("  ", 1)
            head = f"{end - start} x {kind}  {rest} each"
            lines.append(f"{label}  {head}")
        else:
            lines.append(f"{name}  {head}")
        lines.extend(body)
        start = end
    return lines


def describe_targets(
    model: nn.Module, targets: Target | None = None, exclude: Target | None = None
) -> str:
    """The module tree of ``model`` with parameter counts, marking what ``targets`` select.

    Each line is ``name  Class  parameters`` (parameters of the module and its children);
    identical consecutive siblings print once as ``0-11  12 x Layer ... each``. With
    ``targets`` the selected modules are marked ``<- target`` and a summary follows; a
    pattern that matches nothing raises :class:`deltahooks.TargetError`, as attach would.

    Example:
        >>> from torch import nn
        >>> from deltahooks.preview import describe_targets
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> print(describe_targets(model, nn.Linear, exclude="2"))
        Sequential  30 parameters
          0  Linear  20  <- target
          1  ReLU  0
          2  Linear  10
        targets nn.Linear, exclude '2': 1 module (Linear 1), 20 parameters (66.667% of 30)
    """
    total = _count(model)
    selected: list[str] = []
    if targets is not None:
        selected = [path for path, _ in resolve_targets(model, targets, exclude)]
    root_mark = f"  {MARK}" if "" in selected else ""
    lines = [f"{type(model).__name__}  {total:,} parameters{root_mark}"]
    lines += ["  " + line for line in _render(model, "", set(selected))]
    if targets is None:
        leaves = sorted(
            {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and is_linear_like(m)}
        )
        if leaves:
            lines.append(f"linear layer names (for --targets, or {ALL_LINEAR!r}): {leaves}")
        return "\n".join(lines)
    modules = model.named_modules()
    chosen = [module for path, module in modules if path in set(selected)]
    params = {id(p): p.numel() for module in chosen for p in module.parameters()}
    kinds = Counter(type(module).__name__ for module in chosen)
    by_kind = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
    share = 100.0 * sum(params.values()) / total if total else 0.0
    noun = "module" if len(chosen) == 1 else "modules"
    where = f"targets {_show(targets)}" + (f", exclude {_show(exclude)}" if exclude else "")
    lines.append(
        f"{where}: {len(chosen)} {noun} ({by_kind}), {sum(params.values()):,} parameters "
        f"({share:.3f}% of {total:,})"
    )
    return "\n".join(lines)


def _show(targets: Target) -> str:
    if isinstance(targets, type):
        return f"{'nn.' if targets.__module__.startswith('torch.nn') else ''}{targets.__name__}"
    if isinstance(targets, (list, tuple)):
        return ", ".join(_show(t) for t in targets)
    return repr(targets)
