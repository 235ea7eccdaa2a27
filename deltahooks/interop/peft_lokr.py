"""Import PEFT LoKr adapters: ``<path>.lokr_w{1,2}`` (or their ``_a``/``_b`` low-rank pairs),
the names and layouts of :class:`~deltahooks.LoKr`."""

from __future__ import annotations

from torch import nn

from ..errors import DeltaFileError, UnsupportedOperationError
from .peft import _peft_pattern, check_paths, peft_importer
from .peft_loha import group_by_layer, patterns, warn_training_dropouts

LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _complete(found: dict) -> bool:
    """One full or low-rank form of each of the two factors."""
    return all(
        (f"lokr_w{i}" in found) != ({f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(found))
        and ((f"lokr_w{i}_a" in found) == (f"lokr_w{i}_b" in found))
        for i in (1, 2)
    )


@peft_importer("LOKR")
def lokr_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoKr: same names and layouts; which factors are low-rank follows from the same
    rule on both sides, so the spec rebuilds the file's structure (the load checks it)."""
    from ..methods import LoKr
    from ..targets import Paths

    if any(key.endswith(".lokr_t2") for key in tensors):
        raise UnsupportedOperationError(
            "PEFT LoKr adapters with use_effective_conv2d=True (lokr_t2) are not supported; "
            "train with use_effective_conv2d=False (PEFT's default)"
        )
    layers = group_by_layer(model, tensors, LOKR_NAMES, "LoKr")
    incomplete = [path for path, found in layers.items() if not _complete(found)]
    if incomplete:
        raise DeltaFileError(f"LoKr layers without both of their factors at {incomplete[:5]}")
    if not layers:
        return [], {}
    warn_training_dropouts(config, "LoKr")
    paths = list(layers)
    check_paths(model, paths)
    r = int(config.get("r", 8))
    ranks = {p: int(_peft_pattern(p, config.get("rank_pattern") or {}, r)) for p in paths}
    spec = LoKr(
        targets=Paths(paths),
        factor=int(config.get("decompose_factor", -1)),
        decompose_both=bool(config.get("decompose_both", False)),
        **patterns(config, paths, ranks),
    )
    state = {f"{path}.{name}": t for path, found in layers.items() for name, t in found.items()}
    return [spec], state
