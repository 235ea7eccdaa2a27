"""Import PEFT OFT adapters (``peft_type`` ``"OFT"``, PEFT ≥ 0.14 layout).

PEFT stores ``<path>.oft_R.weight`` (embeddings: ``<path>.oft_embedding_R.weight``) as
``(blocks, block_size·(block_size-1)/2)``, our ``oft_R`` layout. PEFT adjusts the block
size per layer where it does not divide the width, so the block size of each layer is
read from its tensor and layers are grouped into one :class:`~deltahooks.OFT` spec per
block size.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import DeltaFileError, UnsupportedOperationError
from ..targets import Paths
from .peft import check_paths, peft_importer

SUFFIXES = (".oft_R.weight", ".oft_embedding_R.weight")


def block_size_of(count: int) -> int | None:
    """The ``b`` with ``b·(b-1)/2 == count``, or None."""
    size = (1 + math.isqrt(1 + 8 * count)) // 2
    return size if size * (size - 1) // 2 == count else None


@peft_importer("OFT")
def oft_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT OFT: Cayley(-Neumann) block rotations; ``coft`` and ``block_share`` refused."""
    from ..methods import OFT
    from ..methods.oft import rotated_width

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
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
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
