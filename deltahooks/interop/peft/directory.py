"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), read
into a delta and written from one.

What every PEFT type shares lives here once: reading and writing the two files (each
appears whole), ``modules_to_save`` as a :class:`~deltahooks.Full` part, the key prefixes,
the all-or-nothing attach. The method's own tensors go through its converter in
:mod:`.registry`.

Exported targets are the exact module paths the delta adapted, so PEFT adapts the same
modules whatever target syntax the spec used.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ...attach import attach_with_state
from ...distributed import gathered, writes
from ...errors import DeltaError, DeltaFileError, DeltaStateError, UnsupportedOperationError
from ...formats import register_writer
from ...methods import Full
from ...targets import Paths, resolve_targets
from .registry import EXPORTERS, IMPORTERS, PREFIX, PROMPT_LEARNING, PROMPT_PREFIX


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


@register_writer("peft")
def save_peft(delta, directory: str | os.PathLike, *, task_type: str | None = None) -> None:
    """Write ``delta`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``task_type`` is PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); ``None`` writes none,
    which PEFT loads as a plain ``PeftModel``. A delta PEFT cannot express (two methods,
    a method without an exporter, settings PEFT lacks) raises
    :class:`deltahooks.UnsupportedOperationError` naming the part, and writes nothing.

    Example::

        delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"]))
        dh.save_peft(delta, "my-adapter/")   # or delta.save_peft("my-adapter/")
        peft.PeftModel.from_pretrained(base_model, "my-adapter/")
    """
    if not delta.attached:
        raise DeltaStateError(f"delta {delta.name!r} is detached; attach it again to save it")
    model = delta.model
    by_method: dict[str, list] = {}
    for part in delta.parts:
        by_method.setdefault(part.method, []).append(part)
    heads = by_method.pop("full", [])
    if len(by_method) != 1:
        kinds = sorted(by_method) or ["only Full parts"]
        raise UnsupportedOperationError(
            f"a PEFT adapter directory holds one adapter type (plus modules_to_save), but delta "
            f"{delta.name!r} holds {kinds}; attach and save each method as its own delta"
        )
    ((method, parts),) = by_method.items()
    exporter = EXPORTERS.get(method)
    if exporter is None:
        raise UnsupportedOperationError(
            f"{method} has no PEFT equivalent that deltahooks can write (exportable: "
            f"{sorted(EXPORTERS)}); keep it as a deltahooks file with delta.save(...)"
        )
    indices = sorted({part.spec_index for part in parts})
    fields, tensors = exporter(model, [delta.specs[i] for i in indices], parts)
    with torch.no_grad():
        for part in heads:
            tensors.update({key: t.detach() for key, t in part.tensors.items()})
    task = fields.pop("task_type", None)  # prompt learning: PEFT needs one; the user's wins
    config = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "inference_mode": True,
        "modules_to_save": [part.path for part in heads] + fields.pop("modules_to_save", [])
        or None,
        "revision": None,
        "task_type": task_type or task,
        **fields,
    }
    if config["modules_to_save"]:
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    prefix = PREFIX
    if config["peft_type"] in PROMPT_LEARNING:  # PEFT's keys there: no wrapper in between
        prefix = PROMPT_PREFIX
    named = {(key if key == "prompt_embeddings" else prefix + key): t for key, t in tensors.items()}
    # shared tensors (stored once, on the root; VeRA's projections) are PEFT's model-level
    # state: base_model.<name>, beside the wrapped model rather than in it
    named.update({PROMPT_PREFIX + key: t.detach() for key, t in delta.shared.items()})
    named, sharded = gathered(named)  # FSDP2 shards: a collective, on every rank
    if writes(sharded):
        write(os.fspath(directory), config, named)


def write(directory: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Both files appear whole (temporary name, then rename); the directory may exist."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DeltaFileError(f"{directory!r} is a file; PEFT adapters are directories")
    os.makedirs(directory, exist_ok=True)
    cpu = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
    for name, dump in (
        ("adapter_model.safetensors", lambda path: save_file(cpu, path, {"format": "pt"})),
        ("adapter_config.json", lambda path: _dump_json(config, path)),
    ):
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(handle)
        try:
            dump(temporary)
            os.chmod(temporary, 0o644)
            os.replace(temporary, os.path.join(directory, name))
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _dump_json(config: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
