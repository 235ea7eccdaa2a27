"""The contract between a method and the shared machinery.

A method is a *spec* — a frozen dataclass of hyperparameters that validates itself and
says where it goes — whose :meth:`DeltaSpec.make_part` returns a :class:`Part` per target:
the new tensors, the sites (:mod:`deltahooks.sites`) that use them, and, when the method
is linear in the weights, how to fold it into them. Installing, files, freezing, merging
and detaching are shared, so a user-defined method registered with :func:`register_method`
behaves like a built-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .errors import SpecError, UnsupportedModuleError
from .layers import compute_dtype, kind_of, quantized_weight
from .ledger import join
from .sites import Site
from .targets import Target, describe
from .validate import one_of

METHODS: dict[str, type[DeltaSpec]] = {}
DeviceLike = torch.device | str | None


def register_method(cls: type[DeltaSpec]) -> type[DeltaSpec]:
    """Class decorator: make a spec class known by its ``method`` name, so files load it.

    Example:
        >>> import deltahooks as dh
        >>> from dataclasses import dataclass
        >>> @dh.register_method
        ... @dataclass(frozen=True, kw_only=True)
        ... class Nothing(dh.DeltaSpec):
        ...     method = "doc_nothing"
        >>> dh.spec.METHODS["doc_nothing"] is Nothing
        True
    """
    name = getattr(cls, "method", "")
    if not isinstance(cls, type) or not issubclass(cls, DeltaSpec):
        raise SpecError(f"register_method takes a DeltaSpec subclass, got {cls!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(
            f"{cls.__name__}.method={name!r} must be an identifier naming the method in files, "
            "e.g. method = 'my_lora'"
        )
    known = METHODS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise SpecError(
            f"method name {name!r} is taken by {known.__module__}.{known.__qualname__}; "
            "choose another method = '...'"
        )
    METHODS[name] = cls
    return cls


DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True, kw_only=True)
class DeltaSpec:
    """Base of every method's hyperparameters; ``targets`` uses :mod:`deltahooks.targets`."""

    method: ClassVar[str] = ""
    parameter_targets: ClassVar[bool] = False
    """True: a target string that matches no module may name a parameter; :meth:`make_part`
    then gets a :class:`~deltahooks.targets.ParameterPath` and the module that owns it."""
    layer_kinds: ClassVar[tuple[str, ...]] = ()
    """The layer kinds (:func:`~deltahooks.layers.kind_of`: ``"linear"``, ``"conv"``, ...)
    the method adapts, read by :meth:`takes_kind`; empty where :meth:`check_module` alone
    decides."""
    reads_weights: ClassVar[bool] = True
    """False: the method reads only a layer's input and output, never its weight, so it
    works on quantized layers; :meth:`reads_weight` answers this for every target unless a
    method decides per target (LoRA: DoRA and PiSSA read the weight)."""
    targets: Target
    exclude: Target | None = None
    # the delta's own dtype, e.g. "float32" on a bfloat16 model (master weights in full
    # precision); None: the target's dtype. Sites compute in the activations' dtype.
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.targets is None or (isinstance(self.targets, (list, tuple)) and not self.targets):
            raise SpecError(f"{type(self).__name__}: targets is empty; name at least one module")
        if self.dtype is not None:
            one_of(self, "dtype", self.dtype, DTYPES)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` for invalid hyperparameters (see :mod:`deltahooks.validate`)."""

    def check_module(self, path: str, module: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` when ``module`` cannot take this method."""

    def reads_weight(self, path: str, module: nn.Module) -> bool:
        """Whether the method reads or rewrites ``module``'s weight (a weight site, a copy of
        it, a norm or decomposition of it). Attach refuses such a method on a quantized
        layer (:func:`~deltahooks.layers.is_quantized`), whose weight is packed integers.
        The class's :attr:`reads_weights` by default: a method that only reads the layer's
        input and output (LoRA, IA3, VeRA, adapters) sets it False and so works on
        quantized bases.

        Example:
            >>> import torch, deltahooks as dh
            >>> layer = torch.nn.Linear(2, 2)
            >>> dh.IA3(targets=["0"]).reads_weight("0", layer), dh.OFT(targets=["0"]).reads_weight("0", layer)
            (False, True)
        """
        return self.reads_weights

    def takes_kind(self, module: nn.Module) -> bool:
        """Whether ``module`` is of a layer kind the method adapts (:attr:`layer_kinds`).

        Example:
            >>> import torch, deltahooks as dh
            >>> vera = dh.VeRA(targets=["0"])
            >>> vera.takes_kind(torch.nn.Linear(2, 2)), vera.takes_kind(torch.nn.Embedding(2, 2))
            (True, False)
        """
        return kind_of(module) in self.layer_kinds

    @staticmethod
    def real_build(device: DeviceLike) -> bool:
        """Whether :meth:`make_part` builds real tensors (``device=None``: allocated next to
        the module's own and initialised) rather than a plan (``device="meta"``: shapes
        only, nothing allocated, initialised or drawn from the random generator).

        Example:
            >>> import deltahooks as dh
            >>> dh.DeltaSpec.real_build(None), dh.DeltaSpec.real_build("meta")
            (True, False)
        """
        return device is None

    def check_targets(self, targets: list[tuple[str, nn.Module]]) -> None:
        """Raise a :class:`DeltaError` when the resolved targets together do not fit (e.g. a
        method that acts once on the whole model given two). Per-target checks go in
        :meth:`check_module`."""

    def make_shared(
        self, root: nn.Module, targets: list[tuple[str, nn.Module]], *, device: DeviceLike = None
    ) -> dict[str, torch.Tensor | SharedTensor]:
        """Tensors shared by every target (stored once, on the root); none by default.

        A plain tensor becomes a trainable parameter that files keep; a
        :class:`SharedTensor` may instead be a frozen buffer, and one that files leave out
        (rebuilt by this method at load, e.g. from a seed).
        """
        return {}

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        """Build (without installing) the delta for one target module.

        ``device=None`` builds the tensors next to the module's own; ``device="meta"``
        builds shapes only (no memory, no initialisation), which the loader uses to check
        a file's claims before it allocates anything.
        """
        raise NotImplementedError(f"{type(self).__name__} must define make_part()")

    def saved(self, tensors: dict[str, torch.Tensor]) -> tuple[DeltaSpec, dict[str, torch.Tensor]]:
        """What a file stores of this spec's delta: ``(spec, tensors)``; as they are by default.

        ``tensors`` are the spec's live tensors keyed as in ``delta.state_dict()``
        (``"<target path>.<name>"``). A method whose training form is not its final form
        (PrefixTuning's reparameterisation MLP) returns the final form and the spec that
        builds it; :func:`deltahooks.load` then attaches that spec. Called under
        ``torch.no_grad()``.
        """
        return self, tensors

    def hyperparameters(self) -> dict[str, Any]:
        """Everything but targets, JSON-ready, for files and summaries."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("targets", "exclude")
            and not (f.name == "dtype" and self.dtype is None)  # files as before
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters(),
            "targets": describe(self.targets),
            "exclude": None if self.exclude is None else describe(self.exclude),
        }


def tensor_options(module: nn.Module, device: DeviceLike = None) -> dict[str, Any]:
    """``device``/``dtype`` for a new delta tensor of ``module``: on the device of its
    tensors (or on ``device``, e.g. ``"meta"`` for a plan), in the dtype it computes in
    (:func:`~deltahooks.layers.compute_dtype`: a quantized layer's compute dtype, never
    its integer storage dtype; no ``dtype`` when nothing tells, so the default applies).

    Example:
        >>> import torch
        >>> tensor_options(torch.nn.Linear(2, 2).double(), "meta")
        {'device': 'meta', 'dtype': torch.float64}
    """
    first = next(iter((*module.parameters(), *module.buffers())), None)
    options: dict[str, Any] = {}
    if first is not None:
        options["device"] = first.device
    dtype = compute_dtype(module)
    if dtype is not None:
        options["dtype"] = dtype
    if device is not None:
        options["device"] = device
    return options


def check_quantized(spec: DeltaSpec, path: str, module: nn.Module) -> None:
    """Refuse, before anything is built, a method that reads the weight of a quantized layer.

    Example:
        >>> import torch, deltahooks as dh
        >>> check_quantized(dh.LoRA(targets=["0"]), "0", torch.nn.Linear(2, 2))  # float: fine
    """
    stored_as = quantized_weight(module)
    if stored_as is not None and spec.reads_weight(path, module):
        raise UnsupportedModuleError(
            f"{type(spec).__name__} cannot adapt {path!r} ({type(module).__name__}): it reads "
            f"or rewrites the layer's weight, and the layer has {stored_as}. Use a method "
            "that only reads the layer's input and output (LoRA without dora/pissa/olora, "
            "IA3, VeRA, AdaLoRA, adapters), or exclude the quantized layers"
        )


def refuse_quantized_merge(part: Part, module: nn.Module) -> None:
    """A part on a quantized layer keeps its sites but cannot be folded into the weight:
    ``merge()`` raises :class:`UnsupportedOperationError` saying why."""
    stored_as = quantized_weight(module)
    if stored_as is not None and part.merge_fn is not None:
        part.merge_fn = None
        part.cannot_merge = (
            f"the layer has {stored_as}, and adding the update would mean dequantising and "
            "requantising it, which rounds most of the update away (load the base in floating "
            "point to merge)"
        )


class SharedTensor(NamedTuple):
    """A shared tensor and how it is kept: trainable (a parameter) or frozen (a buffer), and
    saved in files or rebuilt by :meth:`DeltaSpec.make_shared` when a file is loaded."""

    tensor: torch.Tensor
    trainable: bool = True
    saved: bool = True

    @classmethod
    def of(cls, value: torch.Tensor | SharedTensor) -> SharedTensor:
        return value if isinstance(value, SharedTensor) else cls(value)


TensorKey = tuple[str, str]  # (owner module path, local name)
MergeFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class Part:
    """What one spec puts on one target module: the value :meth:`DeltaSpec.make_part` returns.

    A declaration only: attach installs it (:func:`deltahooks.install.install_part`), which
    registers the tensors on the model and keeps an :class:`~deltahooks.install.InstalledPart`
    instead, the record its Delta merges, unmerges and detaches by.

    Args:
        path: the target module's path.
        tensors: the new tensors, ``{local name: tensor}`` (registered as trainable
            parameters on the target), or ``{(owner path, local name): (tensor,
            is_parameter)}`` for tensors on other modules or buffers. Values are on the
            target's device and dtype (or ``meta`` for a plan).
        sites: where the tensors act (:mod:`deltahooks.sites`); site tensor names are
            local names of this part or of the spec's shared tensors. A
            :class:`~deltahooks.sites.WeightSite` whose ``attr`` is dotted
            (``"out_proj.weight"``) sits on that submodule of the target and names the
            part's tensors registered there (keys ``("<path>.out_proj", local)``).
        merge: ``merge(module, tensors) -> {relative path of a tensor: new value}`` for
            methods that can be folded into the weights; ``tensors`` maps local (and
            shared) names to the live tensors. None: the method cannot merge.
        cannot_merge: why not, for the error when ``merge`` is None.
        merge_order: parts that replace a tensor (0) merge before those that add to it (1).
        exclusive_merge: the merged update is exact only when no other unmerged delta acts
            on the same module (true of updates that scale the layer, like IA3: folding a
            scale into the weights would also scale, or stop scaling, what the other
            delta adds). Additive updates (LoRA, BitFit) commute with everything and leave
            it False; their output sites use ``prepend=True`` so they count as part of the
            layer for every other hook.
        unsaved: local names of buffers in ``tensors`` that the method rebuilds in
            ``make_part`` from the base model (a weight's residual, say): they live on the
            model while attached but are not part of the delta's ``state_dict`` or file.
        target: what the part was resolved from, as files record it and ``delta.paths``
            lists it: ``path`` by default, a :class:`~deltahooks.targets.ParameterPath`
            for a part that adapts one parameter of the module at ``path``.
        note: how the part acts when that is not the method's usual way, for summaries
            (e.g. through the weight because the model reads it without calling the layer).
    """

    def __init__(
        self,
        path: str,
        tensors: Mapping,
        sites: Iterable[Site] = (),
        *,
        merge: MergeFn | None = None,
        cannot_merge: str = "",
        merge_order: int = 1,
        exclusive_merge: bool = False,
        unsaved: Iterable[str] = (),
        target: str | None = None,
        note: str = "",
    ) -> None:
        self.path = path
        self.note = note
        self.target = path if target is None else target
        self.tensors: dict[TensorKey, tuple[torch.Tensor, bool]] = {}
        for key, value in tensors.items():
            owner, local = (path, key) if isinstance(key, str) else key
            self.tensors[(owner, local)] = value if isinstance(value, tuple) else (value, True)
        self.sites = list(sites)
        self.merge_fn = merge
        self.cannot_merge = cannot_merge
        self.merge_order = merge_order
        self.exclusive_merge = exclusive_merge
        self.unsaved = {(path, local) for local in unsaved}

    def cast(self, dtype: torch.dtype) -> None:
        """The part's floating tensors in ``dtype`` (``unsaved`` ones, rebuilt from the
        base weights, keep theirs)."""
        for key, (value, is_parameter) in self.tensors.items():
            if value.is_floating_point() and key not in self.unsaved:
                self.tensors[key] = (value.to(dtype), is_parameter)


def tensor_keys(parts: Iterable[Part]) -> dict[str, torch.Tensor]:
    """``{state_dict key: planned tensor}`` of parts not yet installed."""
    return {
        join(owner, local): value
        for part in parts
        for (owner, local), (value, _) in part.tensors.items()
        if (owner, local) not in part.unsaved
    }
