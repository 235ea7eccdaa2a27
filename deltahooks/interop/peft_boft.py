"""Import PEFT BOFT adapters (``peft_type`` ``"BOFT"``).

PEFT stores ``<path>.boft_R`` (``(butterfly factors, blocks, block_size, block_size)``,
our layout) and ``<path>.boft_s`` (``(out, 1)``; Conv2d: ``(1, out)``, reshaped to ours).
Block size and butterfly factor are read per layer from the tensors, and layers are
grouped into one :class:`~deltahooks.BOFT` spec per pair.
"""

from __future__ import annotations

from torch import nn

from ..errors import DeltaFileError, UnsupportedOperationError
from ..layers import CONV, LINEAR, widths
from ..targets import Paths
from .peft import check_paths, peft_importer
from .peft_export import peft_exporter
from .peft_oft import refuse_unless_peft_takes

LOCALS = ("boft_R", "boft_s")


@peft_importer("BOFT")
def boft_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT BOFT: butterfly Cayley rotations and output scales; ``boft_dropout`` refused."""
    from ..methods import BOFT

    if float(config.get("boft_dropout") or 0.0) > 0.0:
        raise UnsupportedOperationError(
            f"PEFT BOFT with boft_dropout={config['boft_dropout']} (blocks set to identity at "
            "random while training) is not supported; train with boft_dropout=0.0"
        )
    found: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        path, _, local = key.rpartition(".")
        if local in LOCALS:
            found.setdefault(path, {})[local] = tensor
        elif ".base_layer." not in key:  # PEFT also saves a tied or embedding layer's weight
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no BOFT layer")
    incomplete = [path for path, pair in found.items() if set(pair) != set(LOCALS)]
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
