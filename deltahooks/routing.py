"""Per-sample routing: one batch in which each row goes through its own delta(s).

``with dh.route(model, ["a", "b", None]):`` gives each routed delta's switch a
:class:`Rows` selection; its output and input sites (:mod:`deltahooks.sites`) then compute
on those rows only and leave the others as they are, so row *i* of the batch equals a run
of that row alone with its delta(s) active. Deltas that change weights (weight sites:
LNTuning, LoHa, LoKr, OFT/BOFT on convolutions; redirects: Full, LoRA with PiSSA/OLoRA)
or the call itself (prompt and prefix tuning) act on the whole batch at once, so routing
refuses them: the batch is not split behind the user's back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .attach import deltas
from .delta import Delta
from .errors import DeltaStateError, SpecError, UnsupportedOperationError
from .sites import InputSite, OutputSite

RowEntry = str | None | Sequence[str]
_MISSING = object()


class Rows:
    """The rows of a routed batch that one delta acts on (a :class:`switch.RowSelection`).

    A module may see the batch ``k`` times as large, each row repeated ``k`` times in
    place (``generate()`` expands rows so for beam search and ``num_return_sequences``;
    a layer that flattens ``batch × sequence`` into rows does the same): row ``j`` then
    belongs to routed row ``j // k``.
    """

    __slots__ = ("batch", "cache", "name", "rows")

    def __init__(self, name: str, rows: list[int], batch: int) -> None:
        self.name = name
        self.rows = rows
        self.batch = batch
        self.cache: dict = {}

    def index(self, batch: int, device: torch.device, module: nn.Module) -> torch.Tensor | None:
        found = self.cache.get((batch, device), _MISSING)
        if found is not _MISSING:
            return found
        if batch % self.batch:
            raise DeltaStateError(
                f"dh.route was given {self.batch} rows, but {type(module).__name__} (delta "
                f"{self.name!r}) got a batch of {batch}; pass one entry per row of the batch"
            )
        if len(self.rows) == self.batch:
            found = None  # every row: the ordinary (unrouted) computation
        else:
            repeat = batch // self.batch
            rows = torch.tensor(self.rows, dtype=torch.long)
            found = (rows[:, None] * repeat + torch.arange(repeat)).flatten().to(device)
        self.cache[(batch, device)] = found
        return found


def _names_of(entry: RowEntry, position: int) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (list, tuple)) and all(isinstance(name, str) for name in entry):
        if len(set(entry)) != len(entry):
            raise SpecError(f"dh.route: row {position} names a delta twice: {list(entry)}")
        return tuple(entry)
    raise SpecError(
        f"dh.route: row {position} is {entry!r}; give each row a delta name, None (the base "
        "model) or a list of names (their deltas stacked), e.g. ['a', None, ['a', 'b']]"
    )


def _refuse_unroutable(delta: Delta) -> None:
    for part in delta._parts:
        for site in part.sites:
            if not isinstance(site, (OutputSite, InputSite)):
                method = delta.specs[part.spec_index].method
                raise UnsupportedOperationError(
                    f"dh.route cannot route delta {delta.name!r}: its {method} part on "
                    f"{part.path or '<root>'!r} changes {_what(site)} for the whole batch, so "
                    "it cannot act on some rows only; run those rows in their own call with "
                    f"dh.set_active(model, [{delta.name!r}])"
                )


def _what(site: object) -> str:
    name = type(site).__name__
    if name == "WeightSite":
        return "a weight"
    if name == "RedirectSite":
        return "what the layer's tensors are"
    return "the model call"


def _plan(model: nn.Module, rows: Sequence[RowEntry]) -> tuple[dict[str, Delta], dict]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"dh.route needs an nn.Module, got {type(model).__name__}")
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise SpecError(
            f"dh.route needs one entry per row of the batch, e.g. ['a', 'b', None]; got {rows!r}"
        )
    per_row = [_names_of(entry, i) for i, entry in enumerate(rows)]
    found = deltas(model)
    unknown = sorted({name for names in per_row for name in names} - set(found))
    if unknown:
        raise DeltaStateError(
            f"dh.route: no delta named {unknown} on {type(model).__name__}; "
            f"attached: {sorted(found)}"
        )
    busy = sorted(name for name, delta in found.items() if delta._switch.rows is not None)
    if busy:
        raise DeltaStateError(
            f"dh.route is already routing {busy} on this model; leave that `with dh.route(...)` "
            "block before entering another"
        )
    merged = sorted(name for name, delta in found.items() if delta.merged)
    if merged:
        raise DeltaStateError(
            f"deltas {merged} are merged into the weights, so every row would go through "
            "them; call delta.unmerge() on them before dh.route"
        )
    selected: dict[str, list[int]] = {}
    for i, names in enumerate(per_row):
        for name in names:
            selected.setdefault(name, []).append(i)
    for name in selected:
        _refuse_unroutable(found[name])
    return found, {name: Rows(name, where, len(rows)) for name, where in selected.items()}


@contextlib.contextmanager
def route(model: nn.Module, rows: Sequence[RowEntry]) -> Iterator[None]:
    """Context manager: row *i* of each batch goes through the delta named by ``rows[i]``.

    Each entry is a delta name, ``None`` (the base model: no delta) or a list of names
    (those deltas stacked, as when they are active together). Inside the block every call
    of ``model`` (a forward, or ``generate()`` with greedy, sampling or beam search)
    computes row *i* as if that row were run alone with only its deltas active; deltas no
    row names are off for every row. A routed delta computes on its own rows only, so a
    batch of *n* rows over *n* deltas costs about what one delta costs on the batch.
    The deltas' enabled states come back when the block ends.

    The batch must be the first dimension of the routed layers' inputs and outputs. A
    layer that sees the batch ``k`` times as large takes it as each row repeated ``k``
    times in place (what ``generate()`` does for ``num_beams`` and
    ``num_return_sequences``); any other batch size is an error.

    Routing works for deltas that act on a layer's output or input (LoRA and DoRA,
    adapters, IA3, VeRA, AdaLoRA, ReFT, BitFit, OFT/BOFT on Linear layers, ...). A delta
    that changes the weights themselves (LNTuning, LoHa, LoKr, OFT/BOFT on convolutions,
    Full, LoRA with ``init="pissa"``/``"olora"``) or the model call (prompt and prefix
    tuning) would act on the whole batch, and is refused: run its rows in a call of
    their own with :func:`deltahooks.set_active`. Routing changes state the hooks read,
    so one model routes one batch at a time (not from several threads at once). A model
    compiled with ``torch.compile`` routes too (equal to eager): each routing pattern
    compiles a graph of its own, and the unrouted graph is reused after the block.

    Raises:
        deltahooks.SpecError: ``rows`` is empty or an entry is not a name, ``None`` or a
            list of names.
        deltahooks.DeltaStateError: a name is not attached; a delta is merged (unmerge
            it first); the model is already inside ``dh.route``; a layer sees a batch
            that is not a multiple of ``len(rows)``.
        deltahooks.UnsupportedOperationError: a named delta changes weights or the call.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> a = dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"), name="a")
        >>> b = dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"), name="b")
        >>> x = torch.randn(3, 4)
        >>> with dh.route(model, ["a", "b", None]):
        ...     y = model(x)
        >>> dh.set_active(model, ["b"])
        >>> torch.allclose(y[1], model(x[1:2])[0], atol=1e-6)
        True
    """
    found, selections = _plan(model, rows)
    enabled = {name: delta.enabled for name, delta in found.items()}
    try:
        for name, delta in found.items():
            if name in selections:
                delta.enable()
                delta._switch.rows = selections[name]
            else:
                delta.disable()
        yield
    finally:
        for name, delta in found.items():
            delta._switch.rows = None
            if delta.attached:
                if enabled[name]:
                    delta.enable()
                elif not delta.merged:
                    delta.disable()
