"""PEFT VeRA adapters (``peft_type`` ``"VERA"``), both ways.

PEFT stores ``<path>.vera_lambda_b`` / ``<path>.vera_lambda_d`` per layer and, with
``save_projection=True``, the shared projections once as ``base_model.vera_A`` and
``base_model.vera_B``; ours are the same tensors under ``vera_A`` / ``vera_B``. Without
them, both libraries redraw the projections from ``projection_prng_key``.
"""

from __future__ import annotations

from torch import nn

from ...errors import DeltaFileError
from ...layers import CONV1D_GPT2, kind_of
from ...methods import VeRA
from ...targets import Paths
from .registry import peft_exporter, peft_importer
from .settings import check_paths, one_setting

PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
VECTORS = (".vera_lambda_b", ".vera_lambda_d")


@peft_importer("VERA")
def from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    vectors: dict[str, dict] = {}
    projections, other = {}, []
    for key, tensor in tensors.items():
        if key in PROJECTIONS:
            projections[PROJECTIONS[key]] = tensor
            continue
        for suffix in VECTORS:
            if key.endswith(suffix):
                vectors.setdefault(key[: -len(suffix)], {})[suffix[1:]] = tensor
                break
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no VeRA layer")
    incomplete = [path for path, pair in vectors.items() if len(pair) != 2]
    if incomplete:
        raise DeltaFileError(f"VeRA vectors without their pair at {incomplete[:5]}")
    if not vectors:
        return [], {}
    save_projection = bool(config.get("save_projection", True))
    if save_projection and set(projections) != set(PROJECTIONS.values()):
        raise DeltaFileError(
            "the adapter says save_projection=True but holds no base_model.vera_A / vera_B; "
            "save it again with PEFT, or set save_projection to false in adapter_config.json "
            "to redraw them from projection_prng_key"
        )
    paths = list(vectors)
    check_paths(model, paths)
    spec = VeRA(
        targets=Paths(paths),
        r=int(config.get("r", 256)),
        projection_prng_key=int(config.get("projection_prng_key", 0)),
        save_projection=save_projection,
        dropout=float(config.get("vera_dropout", 0.0)),
        d_initial=float(config.get("d_initial", 0.1)),
    )
    state = {f"{path}.{name}": t for path, pair in vectors.items() for name, t in pair.items()}
    if save_projection:  # else PEFT ignores stored projections and redraws them: so do we
        state.update(projections)
    return [spec], state


@peft_exporter("vera")
def to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """VeRA: ``<path>.vera_lambda_b`` / ``vera_lambda_d`` as ours; the shared projections
    (with ``save_projection``) are the delta's shared tensors, which
    :func:`~deltahooks.save_peft` writes as ``base_model.vera_A`` /
    ``base_model.vera_B``."""
    settings = {
        name: one_setting("VeRA", specs, name)
        for name in ("r", "projection_prng_key", "save_projection", "dropout", "d_initial")
    }
    tensors, conv1d = {}, False
    for part in parts:
        conv1d |= kind_of(model.get_submodule(part.path)) == CONV1D_GPT2
        for name in ("vera_lambda_b", "vera_lambda_d"):
            tensors[f"{part.path}.{name}"] = part.tensors[f"{part.path}.{name}"].detach()
    fields = {
        "peft_type": "VERA",
        "target_modules": sorted(part.path for part in parts),
        "r": settings["r"],
        "projection_prng_key": settings["projection_prng_key"],
        "save_projection": settings["save_projection"],
        "vera_dropout": settings["dropout"],
        "d_initial": settings["d_initial"],
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "init_weights": True,
    }
    return fields, tensors
