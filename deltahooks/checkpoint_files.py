"""The files of a transformers checkpoint folder: which hold the weights, their shapes, and
writing a new folder with some tensors replaced, whole or not at all.

No model is involved here; :mod:`deltahooks.checkpoint` loads the model and merges the
delta that decides what is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DeltaFileError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

Progress = Callable[[str], None]


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


def stored_shapes(folder: str, files: list[str]) -> dict[str, tuple[str, list[int]]]:
    """Every stored tensor's file and shape, read from the headers (no data)."""
    layout = {}
    for name in files:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    layout[key] = (name, handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise DeltaFileError(f"cannot read {name!r} in {folder!r}: {err}") from None
    return layout


def check_output(out_dir: str, folder: str) -> None:
    """``out_dir`` can be written: new or empty, not the input ``folder``, in a folder that exists."""
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


def staging_folder(out_dir: str) -> str:
    """A new hidden folder beside ``out_dir`` to write into before :func:`publish`."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    return tempfile.mkdtemp(prefix=".deltahooks-merge-", dir=parent)


def write_shards(
    folder: str, files: list[str], out: str, replace: dict[str, torch.Tensor], progress: Progress
) -> None:
    """Write each weight file again into ``out``: the ``replace`` tensors in the stored
    dtype, every other tensor (and the file's metadata) as it was."""
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
        save_file(tensors, os.path.join(out, name), metadata)
        del tensors


def publish(staging: str, out_dir: str) -> None:
    """Move the finished ``staging`` folder to ``out_dir`` in one rename: it appears whole."""
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked before
    os.rename(staging, out_dir)


def copy_side_files(folder: str, out: str, written: set[str], progress: Progress) -> list[str]:
    """Copy the folder's other files (config, tokenizer, ...); weights are left out."""
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
