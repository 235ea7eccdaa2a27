"""The PEFT converters, found by name: one importer per PEFT ``peft_type`` and one
exporter per deltahooks method.

Each method family's file (:mod:`.lora`, :mod:`.lycoris`, :mod:`.oft`, ...) registers
both directions here; :mod:`.directory` reads and writes the adapter directory and hands
the tensors to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # prompt and prefix tuning: PeftModel holds the model directly
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING")

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


Exporter = Callable[[nn.Module, list, list], tuple[dict, dict[str, torch.Tensor]]]
EXPORTERS: dict[str, Exporter] = {}
"""method → ``exporter(model, specs, parts) -> (config fields, tensors by bare PEFT key)``.

``specs`` are the delta's specs of that method (by ``spec_index`` order), ``parts`` their
:class:`~deltahooks.delta_tensors.PartView` s; keys are without PEFT's ``base_model.model.``.
An exporter raises :class:`UnsupportedOperationError` for what PEFT cannot express.
"""


def peft_exporter(method: str) -> Callable[[Exporter], Exporter]:
    """Register the PEFT exporter of one deltahooks method (``"lora"``, ``"ia3"``, ...)."""

    def register(exporter: Exporter) -> Exporter:
        EXPORTERS[method] = exporter
        return exporter

    return register
