"""Quantized layers keep passing gradients while a delta is attached.

bitsandbytes' 4-bit layers, on a CPU with AVX512-BF16 (``Linear4bit``'s instance flag
``support_avx512bf16_for_cpu``), repack their weight for a faster inference kernel at the
first forward in eval mode whose input needs no gradient (an evaluation under
``torch.no_grad()``). The repacking stays after ``model.train()`` and the kernel has no
backward, so from then on no gradient reaches anything before such a layer: every LoRA
tensor on ``q_proj``/``v_proj`` sits behind an ``o_proj`` and gets none (PEFT's QLoRA loses
them the same way). While a delta is attached, the flag reads false on every layer of the
model that has it (an instance attribute set through the ledger, so detach puts the
original back), and layers repacked before attach get the trainable layout back (the one
bitsandbytes itself restores to save a ``state_dict``). The price: with a delta attached,
CPU inference on such machines uses bitsandbytes' general 4-bit kernel.
"""

from __future__ import annotations

from torch import nn

from .ledger import Ledger

INFERENCE_REPACK_FLAG = "support_avx512bf16_for_cpu"


def _repacked(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_trainable_layout(ledger: Ledger) -> None:
    """Turn off the inference-only repacking of 4-bit layers under ``ledger.root``.

    Example:
        >>> import torch
        >>> from deltahooks.ledger import Ledger
        >>> layer = torch.nn.Linear(2, 2)
        >>> layer.support_avx512bf16_for_cpu = True  # as bitsandbytes' Linear4bit sets it
        >>> ledger = Ledger(layer, "default")
        >>> keep_trainable_layout(ledger)
        >>> layer.support_avx512bf16_for_cpu
        False
        >>> ledger.undo()
        >>> layer.support_avx512bf16_for_cpu
        True
    """
    for path, module in ledger.root.named_modules():
        if module.__dict__.get(INFERENCE_REPACK_FLAG) is not True:
            continue
        if _repacked(module):
            module.state_dict()  # bitsandbytes unpacks to save: the layout training needs
        ledger.attribute(path, INFERENCE_REPACK_FLAG, False)
