"""Which modules have their weight read by a parent without being called.

Some models never call a layer: transformers' Mamba passes ``mixer.dt_proj.weight`` and
``mixer.conv1d.weight`` straight into its scan, torch's ``nn.MultiheadAttention`` hands
``out_proj.weight`` to ``F.multi_head_attention_forward``, and ``nn.TransformerEncoderLayer``'s
eval fast path gives every weight of the layer to one fused kernel. A forward hook on such
a layer never fires (or fires on one path only), so a method that would act on the
layer's output acts through its weight instead (a weight site): the update is then in
the tensor however it is read.

The test is static and architecture-free: the source of every ancestor's class — its
``forward`` and the methods of its own that ``forward`` reaches through ``self.<name>(...)``
— is parsed once per class, and a read of ``<anything>.<child>.weight`` or
``<anything>.<child>.bias`` as a value (not ``.dtype``, ``.device``, ``.shape`` or another
attribute that only describes it) marks every descendant named ``<child>`` below that
ancestor. A layer that is also called counts too: the weight read is then on another
path (Mamba's fused training kernel, the encoder's fast path), where a hook would be
skipped. A false positive costs only speed (a weight site where a hook would have done);
a read this test cannot see (``getattr(self, name).weight``, a free function that reaches
into a module it is given) is left to the run-time check of sites that never fire.

Example:
    >>> import torch
    >>> attention = torch.nn.MultiheadAttention(8, 2)
    >>> sorted(direct_reads(attention, "out_proj"))
    ['bias', 'weight']
    >>> direct_reads(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0")
    frozenset()
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .layers import quantized_weight
from .ledger import join
from .merging import stored
from .validate import name_of

TENSORS = ("weight", "bias")
# attributes of a tensor that describe it without reading its values
METADATA = frozenset(
    {
        "dtype",
        "device",
        "shape",
        "ndim",
        "size",
        "dim",
        "numel",
        "requires_grad",
        "is_cuda",
        "is_meta",
        "is_floating_point",
        "is_contiguous",
        "data_ptr",
        "layout",
        "__class__",
        "nbytes",
        "element_size",
        "itemsize",
    }
)

# calls that look at what a tensor is, not at its values
DESCRIBING = frozenset({"isinstance", "type", "hasattr", "getattr", "id", "len", "callable"})


def _method_source(cls: type, name: str) -> ast.AST | None:
    """The parsed source of ``cls.<name>`` (where the MRO finds it), or None."""
    for owner in cls.__mro__:
        if owner is nn.Module or owner is object:
            return None
        function = owner.__dict__.get(name)
        if function is None:
            continue
        function = getattr(function, "__func__", function)
        function = inspect.unwrap(function)
        try:
            source = textwrap.dedent(inspect.getsource(function))
            return ast.parse(source)
        except (OSError, TypeError, ValueError, RuntimeError, SyntaxError):  # no source: no reads
            return None
    return None


class _Reads(ast.NodeVisitor):
    def __init__(self) -> None:
        self.children: set[tuple[str, str]] = set()  # (child name, tensor name)
        self.methods: set[str] = set()  # self.<name>(...) calls
        self.metadata: set[int] = set()  # ids of nodes read only for their metadata

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in METADATA:
            self.metadata.add(id(node.value))
        inner = node.value
        if (
            node.attr in TENSORS
            and isinstance(inner, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and id(node) not in self.metadata
        ):
            self.children.add((inner.attr, node.attr))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            self.metadata.update(id(operand) for operand in (node.left, *node.comparators))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in DESCRIBING and node.args:
            self.metadata.add(id(node.args[0]))
        if isinstance(func, ast.Attribute):
            target = func.value
            if isinstance(target, ast.Name) and target.id == "self":
                self.methods.add(func.attr)
            elif isinstance(target, ast.Call) and getattr(target.func, "id", None) == "super":
                self.methods.add(func.attr)
        self.generic_visit(node)


@cache
def class_reads(cls: type) -> frozenset[tuple[str, str]]:
    """``{(child name, "weight" | "bias")}`` that ``cls``'s forward reads as values.

    Follows the methods of the class that ``forward`` calls on ``self`` (and through
    ``super()``); cached per class. Classes of torch's own that only call their children
    (``nn.Sequential``, ``nn.ModuleList``) read none.

    Example:
        >>> sorted(class_reads(nn.MultiheadAttention))
        [('out_proj', 'bias'), ('out_proj', 'weight')]
    """
    found: set[tuple[str, str]] = set()
    seen: set[str] = set()
    queue = ["forward"]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = _method_source(cls, name)
        if tree is None:
            continue
        reads = _Reads()
        # visit parents before children so that ``x.weight.dtype`` marks ``x.weight`` first
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in METADATA:
                reads.metadata.add(id(node.value))
        reads.visit(tree)
        found |= reads.children
        queue.extend(m for m in reads.methods if m not in seen and hasattr(cls, m))
    return frozenset(found)


def direct_reads(root: nn.Module, path: str) -> frozenset[str]:
    """The tensors of the module at ``path`` (``"weight"``, ``"bias"``) that one of its
    ancestors reads directly, without calling it (or on a path where it is not called).

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16)
        >>> sorted(direct_reads(layer, "linear1"))  # the eval fast path's fused kernel
        ['bias', 'weight']
    """
    if not path:
        return frozenset()
    names = path.split(".")
    child = names[-1]
    found: set[str] = set()
    module = root
    for name in names[:-1]:
        found |= {tensor for owner, tensor in class_reads(type(module)) if owner == child}
        module = getattr(module, name, None)
        if module is None:
            return frozenset(found)
    found |= {tensor for owner, tensor in class_reads(type(module)) if owner == child}
    target = module._modules.get(child) if isinstance(module, nn.Module) else None
    if target is None:
        return frozenset()
    return frozenset(t for t in found if getattr(target, t, None) is not None)


def reads_directly(root: nn.Module, path: str) -> bool:
    """True when an ancestor reads the module's weight or bias without calling it.

    Example:
        >>> import torch
        >>> reads_directly(torch.nn.MultiheadAttention(8, 2), "out_proj")
        True
    """
    return bool(direct_reads(root, path))


WHY = "via weight (the model reads this layer's tensors without calling it)"
"""What a summary says of a part that acts through a weight site for this reason."""


def needs_weight_site(spec: object, path: str, module: nn.Module, root: nn.Module) -> bool:
    """Whether a method that acts on ``module``'s output must act on its tensors instead,
    because an ancestor reads them without calling it (:func:`direct_reads`).

    ``spec`` is the spec asking (errors take the name of its class), or a method name.

    A quantized layer read that way cannot take a weight site (its weight is packed
    integers): :class:`~deltahooks.UnsupportedModuleError` says so.

    Example:
        >>> import torch, deltahooks as dh
        >>> attention = torch.nn.MultiheadAttention(8, 2)
        >>> needs_weight_site(dh.LoRA(targets=["out_proj"]), "out_proj", attention.out_proj, attention)
        True
    """
    if not reads_directly(root, path):
        return False
    stored_as = quantized_weight(module)
    if stored_as is not None:
        raise UnsupportedModuleError(
            f"{name_of(spec)} cannot adapt {path!r} ({type(module).__name__}): the model reads its "
            f"weight directly instead of calling it, so the update must go into the weight, "
            f"and the layer has {stored_as}; exclude it from targets"
        )
    return True


def merged_by_sites(sites, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    """A part's merge when its weight sites are its math: each site's function applied to
    the stored tensor, in at least float32, cast back (``{site attr: new value}``).

    ``tensors`` are the part's live tensors by name relative to ``module``; a dotted site
    attr (``"out_proj.weight"``) names a submodule's tensor and its tensors there.
    """
    values = {}
    for site in sites:
        child, _, attr = site.attr.rpartition(".")
        owner = module.get_submodule(child) if child else module
        current = stored(owner, attr)
        exact = torch.promote_types(current.dtype, torch.float32)
        args = tuple(
            (tensors[join(child, name)] if join(child, name) in tensors else tensors[name]).to(
                exact
            )
            for name in site.tensors
        )
        values[site.attr] = site.fn(current.to(exact), args).to(current.dtype)
    return values
