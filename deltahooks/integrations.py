"""``transformers.Trainer`` with checkpoints that hold the deltas only.

A model with deltas attached trains under the stock ``Trainer`` as it is (the deltas are
its only trainable parameters), but the stock checkpoint holds the whole model. With
:class:`DeltaTrainer` a checkpoint (and ``trainer.save_model()``) holds one safetensors
file with the live tensors of every attached delta, and ``train(resume_from_checkpoint=
...)`` / ``load_best_model_at_end`` copy them back into the attached deltas. The live
tensors, not ``delta.save``'s file: a prefix-tuning MLP must resume as it was, not as the
prefixes it computes. Write a portable delta file with ``delta.save(...)`` after training.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import deltas
from .distributed import gathered
from .errors import DeltaFileError

CHECKPOINT_NAME = "deltahooks_checkpoint.safetensors"


def _trainer_class():
    try:
        from transformers import Trainer
    except ImportError as err:  # pragma: no cover - transformers is optional at import time
        raise ImportError("DeltaTrainer needs transformers: pip install transformers") from err
    return Trainer


def save_checkpoint(model: nn.Module, directory: str) -> str:
    """Write the live tensors of every delta on ``model`` to ``directory``; returns the path.

    Keys are ``<delta name>/<key in delta.state_dict()>``.
    """
    found = deltas(model)
    if not found:
        raise DeltaFileError(
            f"{type(model).__name__} has no delta attached, so a delta-only checkpoint would "
            "be empty; attach one before training (or use transformers.Trainer)"
        )
    live = {
        f"{name}/{key}": t for name, delta in found.items() for key, t in delta.state_dict().items()
    }
    live, _ = gathered(live)  # FSDP2 shards: a collective, on every rank
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in live.items()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_NAME)
    save_file(tensors, path, {"format": "pt", "deltas": ",".join(found)})
    return path


def load_checkpoint(model: nn.Module, directory: str) -> None:
    """Copy a checkpoint's tensors into the deltas attached to ``model`` (same names)."""
    path = os.path.join(directory, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise DeltaFileError(
            f"{directory!r} holds no {CHECKPOINT_NAME}: it is not a DeltaTrainer checkpoint"
        )
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        name, _, local = key.partition("/")
        stored.setdefault(name, {})[local] = tensor
    found = deltas(model)
    if set(stored) != set(found):
        raise DeltaFileError(
            f"{path!r} holds deltas {sorted(stored)} but the model has {sorted(found)} "
            "attached; attach the same deltas (same names) before resuming"
        )
    for name, delta in found.items():
        delta.load_state_dict(stored[name])


class _DeltaCheckpoints:
    """The three Trainer steps that write or read model weights, for deltas only."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_checkpoint(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        load_checkpoint(self.accelerator.unwrap_model(target), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        load_checkpoint(model, self.state.best_model_checkpoint)


def __getattr__(name: str):
    # DeltaTrainer subclasses transformers.Trainer, built on first use so that importing
    # deltahooks never imports transformers.
    if name == "DeltaTrainer":
        trainer = type(
            "DeltaTrainer",
            (_DeltaCheckpoints, _trainer_class()),
            {
                "__module__": __name__,
                "__doc__": """A ``transformers.Trainer`` whose checkpoints hold the deltas only.

    Use it exactly as ``Trainer``, on a model with deltas attached::

        delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"]))
        trainer = DeltaTrainer(model=model, args=args, train_dataset=data)
        trainer.train()                                   # checkpoint-*/ hold one delta file
        trainer.train(resume_from_checkpoint=True)        # copies it back into the delta
        delta.save("final.safetensors")
    """,
            },
        )
        globals()["DeltaTrainer"] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
