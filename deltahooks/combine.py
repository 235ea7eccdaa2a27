"""dh.combine: a new LoRA delta that is a weighted combination of attached LoRA deltas.

Per target layer, with the sources' updates ``ΔWᵢ = sᵢ BᵢAᵢ`` and weights ``wᵢ``:

- ``"cat"``: ``A = [w₁s₁A₁; w₂s₂A₂; …]`` and ``B = [B₁ B₂ …]``, so ``BA = Σ wᵢ ΔWᵢ``
  exactly, at rank ``Σ rᵢ``;
- ``"svd"``: the top-``rank`` singular triplets of ``Σ wᵢ ΔWᵢ``: ``B = U_r S_r``,
  ``A = V_rᵀ`` (the best rank-``rank`` approximation).

The new delta has scale 1 (``alpha = r`` on every layer). These are PEFT's
``add_weighted_adapter`` ``combination_type="cat"`` and ``"svd"``; the math is pure
functions on tensors, the delta is built by :func:`deltahooks.attach`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from . import validate
from .attach import attach_with_state, deltas
from .delta import Delta
from .errors import DeltaStateError, DeltaWarning, SpecError, UnsupportedOperationError
from .methods.lora import LoRA
from .methods.lora_inits import RESIDUAL_INITS
from .targets import Paths

METHODS = ("cat", "svd")

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B) in LoRA's layouts


def cat_factors(terms: Sequence[tuple[float, Factors]]) -> Factors:
    """``(A, B)`` with ``BA = Σ cᵢ BᵢAᵢ``, rank ``Σ rᵢ``, for ``terms = [(cᵢ, (Aᵢ, Bᵢ))]``.

    Example:
        >>> a, b = torch.ones(1, 3), torch.ones(2, 1)
        >>> A, B = cat_factors([(2.0, (a, b)), (0.5, (a, b))])
        >>> A.shape, B.shape, (B @ A)[0, 0].item()
        (torch.Size([2, 3]), torch.Size([2, 2]), 2.5)
    """
    a = torch.cat([factor * a for factor, (a, _) in terms], dim=0)
    b = torch.cat([b for _, (_, b) in terms], dim=1)
    return a, b


def svd_factors(terms: Sequence[tuple[float, Factors]], rank: int) -> Factors:
    """``(A, B)`` of rank ``≤ rank`` closest to ``Σ cᵢ BᵢAᵢ`` (its truncated SVD).

    The sum is formed and decomposed in at least float32; the factors come back in the
    sources' dtype and shapes (convolution kernels included).

    Example:
        >>> a, b = torch.eye(2, 3), torch.eye(3, 2)
        >>> A, B = svd_factors([(1.0, (a, b))], rank=1)
        >>> A.shape, B.shape
        (torch.Size([1, 3]), torch.Size([3, 1]))
    """
    a0, b0 = terms[0][1]
    exact = torch.promote_types(a0.dtype, torch.float32)
    update = sum(
        factor * (b.to(exact).flatten(1) @ a.to(exact).flatten(1)) for factor, (a, b) in terms
    )
    u, singular, vh = torch.linalg.svd(update, full_matrices=False)
    rank = min(rank, singular.shape[0])
    a = vh[:rank].reshape(rank, *a0.shape[1:])
    b = (u[:, :rank] * singular[:rank]).reshape(b0.shape[0], rank, *b0.shape[2:])
    return a.to(a0.dtype), b.to(b0.dtype)


def _sources(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> list[Delta]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise SpecError(f"dh.combine needs a list of delta names, e.g. ['a', 'b']; got {names!r}")
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise SpecError(f"dh.combine names must be distinct delta names, got {list(names)!r}")
    if not isinstance(weights, Sequence) or len(weights) != len(names):
        raise SpecError(
            f"dh.combine needs one weight per delta: {len(names)} names, weights={weights!r}"
        )
    for name, weight in zip(names, weights):
        validate.finite("dh.combine", f"weight of {name!r}", weight)
    found = deltas(model)
    unknown = [name for name in names if name not in found]
    if unknown:
        raise DeltaStateError(
            f"dh.combine: no delta named {unknown} on {type(model).__name__}; "
            f"attached: {sorted(found)}"
        )
    sources = [found[name] for name in names]
    roots = {id(delta.model) for delta in sources}
    if len(roots) > 1:
        raise DeltaStateError(
            f"dh.combine: deltas {list(names)} were attached to different root modules; "
            "attach every delta of one model to the same root"
        )
    for delta in sources:
        if delta.merged:
            raise DeltaStateError(
                f"dh.combine: delta {delta.name!r} is merged into the weights; call "
                "delta.unmerge() first (the combination replaces it in the forward)"
            )
        for part in delta._parts:
            spec = delta.specs[part.spec_index]
            why = _not_combinable(spec)
            if why:
                raise UnsupportedOperationError(
                    f"dh.combine combines plain LoRA deltas; delta {delta.name!r} has "
                    f"{why} on {part.path or '<root>'!r}; combine deltas without it"
                )
    return sources


def _not_combinable(spec) -> str:
    if not isinstance(spec, LoRA):
        return f"a {spec.method} part"
    if spec.dora:
        return "a DoRA part (its magnitudes do not add up)"
    if spec.init in RESIDUAL_INITS:
        return f"a LoRA with init={spec.init!r} (it changes the layer's weight too)"
    return ""


def _max_rank(delta: Delta) -> int:
    """PEFT's default ``svd_rank`` term: the largest rank a delta's specs declare."""
    return max(max([spec.r, *spec.rank_pattern.values()]) for spec in delta.specs)


def combine(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    name: str,
    *,
    method: Literal["cat", "svd"] = "cat",
    rank: int | None = None,
    freeze_base: bool = True,
) -> Delta:
    """Attach a new LoRA delta ``name`` that is ``Σ weights[i] · delta names[i]``.

    Every layer one of the sources adapts gets ``Σ wᵢ sᵢ BᵢAᵢ`` over the sources on it
    (``sᵢ`` each source's own scale). ``method="cat"`` stacks the factors, exact at rank
    ``Σ rᵢ`` per layer; ``method="svd"`` keeps the top ``rank`` singular directions of
    the sum (default: the largest rank the sources declare), the best approximation of
    that rank. Equal to PEFT's ``add_weighted_adapter(..., combination_type="cat" |
    "svd")`` for the same adapters (the new delta's scale is 1). Weights may be
    negative (subtract a delta).

    The combination replaces its sources in the forward: they stay attached but are
    disabled (``dh.set_active`` switches back); other deltas keep their state.

    Args:
        model: the model the source deltas are attached to.
        names: the source LoRA deltas (distinct names), without DoRA and without
            ``init="pissa"``/``"olora"``; not merged.
        weights: one finite number per source.
        name: the new delta's name (not yet attached).
        method: ``"cat"`` (default) or ``"svd"``.
        rank: the rank of an ``"svd"`` combination (capped at each layer's full rank);
            ``None`` for ``"cat"``.
        freeze_base: as in :func:`deltahooks.attach`.

    Raises:
        deltahooks.SpecError: empty or repeated names, a weight count that differs from
            the names, a weight that is not a finite number, an unknown ``method``, a
            ``rank`` that is not a positive integer or given with ``"cat"``, an invalid
            ``name``.
        deltahooks.DeltaStateError: a source is not attached or is merged; ``name`` is
            already attached.
        deltahooks.UnsupportedOperationError: a source has parts other than plain LoRA.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"), name="a")
        >>> _ = dh.attach(model, dh.LoRA(targets=["0"], r=3, init="random"), name="b")
        >>> ab = dh.combine(model, ["a", "b"], [0.7, 0.3], name="ab")
        >>> ab.state_dict()["0.lora_A"].shape, [d.enabled for d in dh.deltas(model).values()]
        (torch.Size([5, 8]), [False, False, True])
    """
    validate.one_of("dh.combine", "method", method, METHODS)
    if method == "cat" and rank is not None:
        raise SpecError("dh.combine rank= applies to method='svd'; 'cat' keeps every rank")
    validate.optional_positive_int("dh.combine", "rank", rank)
    sources = _sources(model, names, weights)
    root = sources[0].model
    if name in deltas(model):
        raise DeltaStateError(
            f"a delta named {name!r} is already attached; pass another name=... to dh.combine"
        )
    if rank is None:
        rank = max(_max_rank(delta) for delta in sources)
    terms: dict[str, list[tuple[float, Factors]]] = {}
    for delta, weight in zip(sources, weights):
        for part, view in zip(delta._parts, delta.parts):
            spec = delta.specs[part.spec_index]
            module = root.get_submodule(part.path)
            _, scale = spec.rank_and_scale(part.path, module, root)
            tensors = view.tensors
            factors = (tensors[f"{part.path}.lora_A"], tensors[f"{part.path}.lora_B"])
            terms.setdefault(part.path, []).append((float(weight) * scale, factors))
    state, ranks = {}, {}
    with torch.no_grad():
        for path, pairs in terms.items():
            a, b = cat_factors(pairs) if method == "cat" else svd_factors(pairs, rank)
            state[f"{path}.lora_A"], state[f"{path}.lora_B"] = a, b
            ranks[path] = a.shape[0]
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    exact = {path: "re:" + re.escape(path) for path in ranks}
    spec = LoRA(
        targets=Paths(list(ranks)),
        r=common,
        alpha=float(common),
        dropout=sources[0].specs[0].dropout,
        rank_pattern={exact[p]: r for p, r in ranks.items() if r != common},
        alpha_pattern={exact[p]: float(r) for p, r in ranks.items() if r != common},
    )
    with warnings.catch_warnings():  # a cat rank above a layer's full rank is still exact
        warnings.filterwarnings("ignore", "LoRA rank .* exceeds the full rank", DeltaWarning)
        combined = attach_with_state(root, [spec], state, name=name, freeze_base=freeze_base)
    for delta in sources:
        delta.disable()
    return combined
