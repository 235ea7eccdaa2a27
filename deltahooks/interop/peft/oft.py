"""PEFT's orthogonal adapters, OFT and BOFT, both ways.

OFT (``peft_type`` ``"OFT"``, PEFT ≥ 0.14 layout): PEFT stores ``<path>.oft_R.weight`` (embeddings: ``<path>.oft_embedding_R.weight``) as
``(blocks, block_size·(block_size-1)/2)``, our ``oft_R`` layout. PEFT adjusts the block
size per layer where it does not divide the width, so the block size of each layer is
read from its tensor and layers are grouped into one :class:`~deltahooks.OFT` spec per
block size.

BOFT: PEFT stores ``<path>.boft_R`` (``(butterfly factors, blocks, block_size, block_size)``,
our layout) and ``<path>.boft_s`` (``(out, 1)``; Conv2d: ``(1, out)``, reshaped to ours).
Block size and butterfly factor are read per layer from the tensors, and layers are
grouped into one :class:`~deltahooks.BOFT` spec per pair.
"""

from __future__ import annotations

import math
from collections import Counter

from torch import nn

from ...errors import DeltaFileError, UnsupportedOperationError
from ...layers import CONV, EMBEDDING, LINEAR, kind_of, widths
from ...methods import BOFT, OFT
from ...methods._orthogonal import PEFT_OFT_BLOCK_SIZE
from ...methods.oft import rotated_width
from ...targets import Paths
from .registry import peft_exporter, peft_importer
from .settings import check_paths, one_setting

OFT_SUFFIXES = (".oft_R.weight", ".oft_embedding_R.weight")
BOFT_LOCALS = ("boft_R", "boft_s")


def block_size_of(count: int) -> int | None:
    """The ``b`` with ``b·(b-1)/2 == count``, or None."""
    size = (1 + math.isqrt(1 + 8 * count)) // 2
    return size if size * (size - 1) // 2 == count else None


@peft_importer("OFT")
def oft_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT OFT: Cayley(-Neumann) block rotations; ``coft`` and ``block_share`` refused."""
    if config.get("coft"):
        raise UnsupportedOperationError(
            "PEFT OFT with coft=True (constrained OFT, which projects the parameters inside "
            "the forward) is not supported; train with coft=False"
        )
    if config.get("block_share"):
        raise UnsupportedOperationError(
            "PEFT OFT with block_share=True (one block shared by all) is not supported; "
            "train with block_share=False"
        )
    found: dict[str, object] = {}
    other = []
    for key, tensor in tensors.items():
        suffix = next((s for s in OFT_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            found[key[: -len(suffix)]] = tensor
        elif ".base_layer." not in key:  # PEFT also saves a targeted embedding's own weight
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no OFT layer")
    if not found:
        return [], {}
    check_paths(model, list(found))
    groups: dict[int, list[str]] = {}
    for path, tensor in found.items():
        module = model.get_submodule(path)
        size = block_size_of(tensor.shape[-1]) if tensor.dim() == 2 else None
        width = rotated_width(module) if hasattr(module, "weight") else None
        if size is None or width is None or tensor.shape[0] * size != width:
            raise DeltaFileError(
                f"OFT tensor of {path!r} has shape {tuple(tensor.shape)}, which is no "
                f"(blocks, b·(b-1)/2) layout for that layer's width {width}"
            )
        groups.setdefault(size, []).append(path)
    neumann = bool(config.get("use_cayley_neumann", True))
    terms = int(config.get("num_cayley_neumann_terms", 5))
    specs = [
        OFT(
            targets=Paths(paths),
            block_size=size,
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=terms,
        )
        for size, paths in groups.items()
    ]
    return specs, {f"{path}.oft_R": tensor for path, tensor in found.items()}


# ------------------------------------------------------------------------------ export
NEUMANN_SINCE = "0.18.0"  # PEFT's Cayley-Neumann formula (ours) since this version


def peft_block_size(width: int, block_size: int) -> int:
    """The block size PEFT's OFT uses on a layer ``width`` wide when asked for
    ``block_size`` (``OFTLayer.update_layer``): the request where it divides the width,
    else the divisor nearest to it (ties to the smaller), the whole width from above.

    Example:
        >>> peft_block_size(64, 32), peft_block_size(48, 32), peft_block_size(20, 32)
        (32, 24, 20)
    """
    if width % block_size == 0 and block_size <= width:
        return block_size
    if block_size >= width:
        return width
    lower = block_size
    while lower > 1 and width % lower:
        lower -= 1
    higher = block_size
    while higher <= width and width % higher:
        higher += 1
    return lower if block_size - lower <= higher - block_size else higher


def one_block_size(sizes: dict[str, tuple[int, int]], prefer=()) -> int | None:
    """One ``oft_block_size`` that PEFT turns into every layer's block size, or None.

    ``sizes`` maps a path to ``(width, block size)``; the ``prefer`` values are tried
    first, then every request from 1 to the widest width (wider ones act as it does):
    the smallest that works.

    Example:
        >>> one_block_size({"a": (48, 24), "b": (40, 40)}, prefer=[24, 40])
        31
        >>> one_block_size({"a": (64, 16), "b": (64, 32)}) is None
        True
    """
    pairs = sorted(sizes.values())  # the narrowest first: its check fails soonest
    widest = max(width for width, _ in pairs)
    for request in (*prefer, *range(1, widest + 1)):
        if request > 0 and all(peft_block_size(w, request) == size for w, size in pairs):
            return request
    return None


def peft_conv2d_problem(module: nn.Module) -> str | None:
    """Why PEFT's OFT/BOFT cannot hold a convolution like ours, or None for a plain one
    (PEFT takes ``nn.Conv2d`` with one group and a square kernel: a filter of
    ``in_channels · k · k``)."""
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__} (PEFT takes nn.Conv2d only)"
    if module.groups != 1:
        return f"an nn.Conv2d with groups={module.groups} (PEFT takes groups=1)"
    if module.kernel_size[0] != module.kernel_size[1]:
        return f"an nn.Conv2d with kernel {module.kernel_size} (PEFT takes square kernels)"
    return None


def refuse_unless_peft_takes(
    method: str, path: str, module: nn.Module, kinds: dict, problem: str | None = None
) -> str:
    """The layer kind of ``module`` if PEFT's ``method`` takes it (``kinds``: kind → name
    for the message), else :class:`UnsupportedOperationError` naming the layer and why
    (``problem``: a reason of the caller's own)."""
    kind = kind_of(module)
    problem = (peft_conv2d_problem(module) if kind == CONV else None) or problem
    if kind not in kinds:
        *rest, last = kinds.values()
        takes = f"{', '.join(rest)} and {last}" if rest else last
        problem = f"a {type(module).__name__} (PEFT's {method} takes {takes})"
    if problem:
        raise UnsupportedOperationError(
            f"{method} on {path!r}, {problem}, has no PEFT form; keep this delta as a "
            "deltahooks file with delta.save(...), or leave that layer out of targets"
        )
    return kind


@peft_exporter("oft")
def oft_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """OFT: ``<path>.oft_R.weight`` (embeddings: ``oft_embedding_R.weight``), our layout;
    one ``oft_block_size`` that PEFT adjusts into every layer's block size."""
    neumann = one_setting("OFT", specs, "use_cayley_neumann")
    terms = one_setting("OFT", specs, "num_cayley_neumann_terms")
    sizes, tensors = {}, {}
    kinds = {LINEAR: "Linear", CONV: "Conv2d", EMBEDDING: "Embedding"}
    for part in parts:
        module = model.get_submodule(part.path)
        dilation = getattr(module, "dilation", (1,))
        dilated = f"an nn.Conv2d with dilation={dilation} (PEFT's OFT takes 1)"
        kind = refuse_unless_peft_takes(
            "OFT", part.path, module, kinds, dilated if dilation[0] > 1 else None
        )
        vector = part.tensors[f"{part.path}.oft_R"].detach()
        sizes[part.path] = (rotated_width(module), block_size_of(vector.shape[-1]))
        name = "oft_embedding_R" if kind == EMBEDDING else "oft_R"
        tensors[f"{part.path}.{name}.weight"] = vector
    requested = [spec.block_size or PEFT_OFT_BLOCK_SIZE for spec in specs]
    common = Counter(size for _, size in sizes.values()).most_common()
    block_size = one_block_size(sizes, prefer=[*requested, *(size for size, _ in common)])
    if block_size is None:
        listed = ", ".join(f"{p!r}: {s} of {w}" for p, (w, s) in sorted(sizes.items())[:8])
        raise UnsupportedOperationError(
            "PEFT's OFT holds one oft_block_size and adjusts it per layer, and no single value "
            f"gives this delta's block sizes (layer: block size of width: {listed}); save the "
            "layers whose block sizes differ as separate deltas, or keep it as a deltahooks "
            "file with delta.save(...)"
        )
    fields = {
        "peft_type": "OFT",
        "target_modules": sorted(sizes),
        "r": 0,
        "oft_block_size": block_size,
        "use_cayley_neumann": neumann,
        "num_cayley_neumann_terms": terms,
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "module_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "peft_version": NEUMANN_SINCE,
    }
    return fields, tensors


# ------------------------------------------------------------------------------- BOFT
@peft_importer("BOFT")
def boft_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT BOFT: butterfly Cayley rotations and output scales; ``boft_dropout`` refused."""
    if float(config.get("boft_dropout") or 0.0) > 0.0:
        raise UnsupportedOperationError(
            f"PEFT BOFT with boft_dropout={config['boft_dropout']} (blocks set to identity at "
            "random while training) is not supported; train with boft_dropout=0.0"
        )
    found: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        path, _, local = key.rpartition(".")
        if local in BOFT_LOCALS:
            found.setdefault(path, {})[local] = tensor
        elif ".base_layer." not in key:  # PEFT also saves a tied or embedding layer's weight
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no BOFT layer")
    incomplete = [path for path, pair in found.items() if set(pair) != set(BOFT_LOCALS)]
    if incomplete:
        raise DeltaFileError(f"BOFT tensors without their pair at {incomplete[:5]}")
    if not found:
        return [], {}
    check_paths(model, list(found))
    groups: dict[tuple[int, int], list[str]] = {}
    state = {}
    for path, pair in found.items():
        size = widths(model.get_submodule(path))
        blocks, scale = pair["boft_R"], pair["boft_s"]
        if (
            size is None
            or blocks.dim() != 4
            or blocks.shape[1] * blocks.shape[2] != size[0]
            or blocks.shape[2] != blocks.shape[3]
            or scale.numel() != size[1]
        ):
            raise DeltaFileError(
                f"BOFT tensors of {path!r} have shapes {tuple(blocks.shape)} and "
                f"{tuple(scale.shape)}, which do not fit that layer (in, out) = {size}"
            )
        groups.setdefault((int(blocks.shape[2]), int(blocks.shape[0])), []).append(path)
        state[f"{path}.boft_R"] = blocks
        state[f"{path}.boft_s"] = scale.reshape(-1, 1)
    specs = [
        BOFT(targets=Paths(paths), block_size=size, butterfly_factor=factor)
        for (size, factor), paths in groups.items()
    ]
    return specs, state


@peft_exporter("boft")
def boft_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """BOFT: ``<path>.boft_R`` as ours, ``<path>.boft_s`` as ``(out, 1)`` (Conv2d:
    ``(1, out)``); PEFT holds one ``boft_block_size`` and one ``boft_n_butterfly_factor``
    and adjusts neither, so every layer must share ours.

    PEFT builds more than one butterfly factor only where its CUDA extension builds (it
    falls back to one elsewhere, and then cannot load such an adapter).
    """
    settings: dict[tuple[int, int], list[str]] = {}
    tensors = {}
    for part in parts:
        module = model.get_submodule(part.path)
        kind = refuse_unless_peft_takes(
            "BOFT", part.path, module, {LINEAR: "Linear", CONV: "Conv2d"}
        )
        blocks = part.tensors[f"{part.path}.boft_R"].detach()
        scale = part.tensors[f"{part.path}.boft_s"].detach()
        settings.setdefault((int(blocks.shape[2]), int(blocks.shape[0])), []).append(part.path)
        tensors[f"{part.path}.boft_R"] = blocks
        tensors[f"{part.path}.boft_s"] = scale.reshape(1, -1) if kind == CONV else scale
    if len(settings) > 1:
        listed = "; ".join(
            f"block_size={size}, butterfly_factor={factor}: {paths[:3]}"
            for (size, factor), paths in sorted(settings.items())
        )
        raise UnsupportedOperationError(
            "PEFT's BOFT holds one boft_block_size and one boft_n_butterfly_factor for all "
            f"layers, but this delta's layers differ ({listed}); save each group as its own "
            "delta (one block_size per spec), or keep it as a deltahooks file with "
            "delta.save(...)"
        )
    ((size, factor),) = settings
    fields = {
        "peft_type": "BOFT",
        "target_modules": sorted(p for paths in settings.values() for p in paths),
        "boft_block_size": size,
        "boft_block_num": 0,
        "boft_n_butterfly_factor": factor,
        "boft_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
    }
    return fields, tensors
