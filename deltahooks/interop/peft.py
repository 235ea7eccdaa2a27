"""Import PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

One importer per PEFT ``peft_type`` (registered with :func:`peft_importer`) turns the
config and the adapter's own tensors into deltahooks specs and their state; the common
part (reading the directory, ``modules_to_save`` as a :class:`~deltahooks.Full` part,
all-or-nothing attach) lives here once.

PEFT LoRA keys look like ``base_model.model.<path>.lora_A.weight`` (embeddings:
``<path>.lora_embedding_A``); ``modules_to_save`` copies are stored under their own
``<path>.<param>``. Our LoRA uses the same layouts, so tensors load without transposes;
``modules_to_save`` becomes a :class:`~deltahooks.Full` part.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import DeltaError, DeltaFileError, UnsupportedOperationError, warn
from ..ledger import join
from ..targets import Paths, resolve_targets
from . import peft_lora_parameters as parameters

PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # prompt and prefix tuning: PeftModel holds the model directly
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING")
LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}
DORA_SUFFIXES = {".lora_magnitude_vector": "lora_magnitude_vector"}  # with use_dora

PEFT_ATTENTION_BUG = (
    "PEFT's LoRA on nn.MultiheadAttention (peft 0.21.2 and earlier) adds out_proj's update "
    "twice, in its forward and its merge (huggingface/peft#3774), so PEFT computes another "
    "model from the same adapter file than deltahooks does (deltahooks adds it once, as the "
    "file's tensors define)"
)


Importer = Callable[[nn.Module, dict, dict[str, torch.Tensor]], tuple[list, dict]]
IMPORTERS: dict[str, Importer] = {}
"""``peft_type`` → ``importer(model, config, tensors) -> (specs, state)``.

``tensors`` are the file's tensors with PEFT's ``base_model.model.`` prefix removed, less
the ``modules_to_save`` copies; an importer raises :class:`DeltaFileError` for a tensor
that is not its own and returns state keyed as the specs' ``delta.state_dict()`` is.
"""


def peft_importer(peft_type: str) -> Callable[[Importer], Importer]:
    """Register the importer of one PEFT ``peft_type`` (``"LORA"``, ``"LOHA"``, ...)."""

    def register(importer: Importer) -> Importer:
        IMPORTERS[peft_type] = importer
        return importer

    return register


def check_paths(model: nn.Module, paths) -> None:
    """Every adapted path names a module of ``model``; else the closest names are listed."""
    known = {p for p, _ in model.named_modules()}
    missing = [p for p in paths if p not in known]
    if missing:  # raises a TargetError that lists the closest module names
        resolve_targets(model, Paths(missing))


def _peft_pattern(path: str, patterns: dict, default):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching a path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read(directory: str) -> tuple[dict, dict]:
    config_path = os.path.join(directory, "adapter_config.json")
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(config_path):
        raise DeltaFileError(
            f"{directory!r} has no adapter_config.json: pass the directory that PEFT's "
            "save_pretrained() wrote"
        )
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DeltaFileError(f"{config_path!r} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise DeltaFileError(f"{config_path!r} does not hold a JSON object")
    if config.get("peft_type") not in IMPORTERS:
        raise DeltaFileError(
            f"peft_type {config.get('peft_type')!r} is not supported by the importer yet "
            f"(supported: {', '.join(repr(t) for t in sorted(IMPORTERS))})"
        )
    if config.get("bias", "none") != "none":
        raise UnsupportedOperationError(
            f"PEFT adapters with bias={config['bias']!r} are not supported yet; train with "
            "bias='none'"
        )
    if not os.path.isfile(weights_path):
        raise DeltaFileError(
            f"{directory!r} has no adapter_model.safetensors (pickled .bin is refused)"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaFileError(
            f"{weights_path!r} is not a readable safetensors file ({err})"
        ) from None
    return config, tensors


def load_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    *,
    freeze_base: bool = True,
):
    """Attach a PEFT adapter directory to ``model`` as a deltahooks delta.

    The model's outputs then equal PEFT's for the same adapter. Supported ``peft_type``
    values are those with an importer (see ``IMPORTERS``); others raise
    :class:`DeltaFileError`, features PEFT has and we do not raise
    :class:`UnsupportedOperationError`. Nothing is attached unless all of it fits.

    Example (``my-adapter/`` as written by PEFT's ``save_pretrained``)::

        delta = dh.load_peft(model, "my-adapter/")
        delta.save("my-adapter.safetensors")  # now a deltahooks file
    """
    from ..attach import attach_with_state
    from ..methods import Full

    directory = os.fspath(directory)
    config, tensors = _read(directory)
    saved = config.get("modules_to_save") or []
    prefix = PROMPT_PREFIX if config["peft_type"] in PROMPT_LEARNING else PREFIX
    bare = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
    try:
        heads = [p for p, _ in resolve_targets(model, list(saved))] if saved else []
        heads = [h for h in heads if any(k.startswith(h + ".") for k in bare)]
        copies = {k: t for k, t in bare.items() if any(k.startswith(h + ".") for h in heads)}
        own = {k: t for k, t in bare.items() if k not in copies}
        specs, state = IMPORTERS[config["peft_type"]](model, config, own)
        if heads:
            specs.append(Full(targets=Paths(heads)))
            state.update(copies)
        if not specs:
            raise DeltaFileError(f"{directory!r} holds no adapter tensors")
    except DeltaFileError as err:
        if directory in str(err):
            raise
        raise DeltaFileError(f"{directory!r}: {err}") from None
    except UnsupportedOperationError:
        raise
    except DeltaError as err:
        raise DeltaFileError(f"{directory!r} does not fit {type(model).__name__}: {err}") from None
    return attach_with_state(model, specs, state, name=name, freeze_base=freeze_base)


@peft_importer("LORA")
def lora_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoRA (and DoRA, ``use_dora``): same tensor layouts and names as ours; rank and
    alpha patterns become exact paths."""
    from ..methods import LoRA

    dora = bool(config.get("use_dora", False))
    suffixes = {**LORA_SUFFIXES, **DORA_SUFFIXES} if dora else LORA_SUFFIXES
    lora: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        for suffix, local in suffixes.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[local] = tensor
                break
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no LoRA layer")
    expected = {"lora_A", "lora_B", *DORA_SUFFIXES.values()} if dora else {"lora_A", "lora_B"}
    incomplete = [path for path, pair in lora.items() if set(pair) != expected]
    if incomplete:
        what = "magnitude vector or pair" if dora else "pair"
        raise DeltaFileError(f"LoRA tensors without their {what} at {incomplete[:5]}")
    if not lora:
        return [], {}
    # nn.MultiheadAttention: PEFT keeps out_proj's pair under "<attention>.base_layer.out_proj";
    # here it belongs to the attention's own part, on its out_proj
    attention: dict[str, dict] = {}
    for key in [
        k for k in lora if k == "base_layer.out_proj" or k.endswith(".base_layer.out_proj")
    ]:
        owner = key[: -len("base_layer.out_proj")].rstrip(".")
        if isinstance(model.get_submodule(owner), nn.MultiheadAttention) and owner in lora:
            attention[owner] = lora.pop(key)
    if attention:
        warn(PEFT_ATTENTION_BUG)
    # target_parameters: PEFT's nested ParamWrappers, keyed by their owner module
    wrapped = parameters.nesting(
        parameters.matched_parameters(model, list(config.get("target_parameters") or []))
    )
    check_paths(model, [p for p in lora if p not in wrapped])
    for prefix, path in wrapped.items():
        if prefix in lora:
            pair = lora.pop(prefix)
            experts = parameters.experts_of(model, path)
            pair["lora_A"], pair["lora_B"] = parameters.from_peft(
                pair["lora_A"], pair["lora_B"], experts
            )
            lora[path] = pair
    paths = list(lora)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks = {p: int(lora[p]["lora_A"].shape[-2 if p in wrapped.values() else 0]) for p in paths}
    alphas = {p: float(_peft_pattern(p, config.get("alpha_pattern") or {}, alpha)) for p in paths}
    exact = {p: "re:" + re.escape(p) for p in paths}
    spec = LoRA(
        targets=Paths(paths),
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        rank_pattern={exact[p]: ranks[p] for p in paths if ranks[p] != r},
        alpha_pattern={exact[p]: alphas[p] for p in paths if alphas[p] != alpha},
        dora=dora,
    )
    state = {f"{path}.{local}": t for path, pair in lora.items() for local, t in pair.items()}
    for owner, pair in attention.items():
        state.update({join(owner, f"out_proj.{local}"): t for local, t in pair.items()})
    return [spec], state


# each method's importer (and exporter) registers itself when its module is imported
from . import (  # noqa: E402, F401
    peft_adalora,
    peft_boft,
    peft_ia3_ln,
    peft_loha,
    peft_lokr,
    peft_lycoris_export,
    peft_oft,
    peft_prompts,
    peft_vera,
)
