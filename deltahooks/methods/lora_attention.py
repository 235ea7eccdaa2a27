"""LoRA on torch's ``nn.MultiheadAttention``, as PEFT adapts it: weight sites on its input
projection (``in_proj_weight``, or ``q/k/v_proj_weight``) and on ``out_proj.weight``,
each ``W ← W + s · BA``, since ``F.multi_head_attention_forward`` reads them all without
calling a layer.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..direct_reads import merged_by_sites
from ..errors import UnsupportedModuleError
from ..layers import LINEAR
from ..ledger import join
from ..merging import stored
from ..sites import WeightSite
from ..spec import Part
from ._lora_layouts import lora_weight, warn_dropout
from .lora_inits import RESIDUAL_INITS, initialise


def attention_part(spec, path: str, module: nn.MultiheadAttention, root, device) -> Part:
    """LoRA on torch's ``nn.MultiheadAttention``: weight sites on its input projection
    (``in_proj_weight``, or ``q/k/v_proj_weight`` when they are separate) and on
    ``out_proj.weight``, since ``F.multi_head_attention_forward`` reads them all
    without calling a layer. The input projection's factors sit on the module
    (``lora_A``/``lora_B``, or ``q_proj_weight.lora_A``, ...), ``out_proj``'s on it."""
    if spec.dora or spec.init in RESIDUAL_INITS:
        raise UnsupportedModuleError(
            f"LoRA {'dora=True' if spec.dora else f'init={spec.init!r}'} cannot adapt "
            f"{path!r} (nn.MultiheadAttention): it acts through the attention's weight "
            "tensors, which that setting does not support; target it with a separate "
            "dh.LoRA spec without it"
        )
    rank, scale = spec.rank_and_scale(path, module, root)
    warn_dropout(path, spec.dropout, device)
    if module._qkv_same_embed_dim:
        projections = [("in_proj_weight", "")]
    else:
        projections = [(f"{x}_proj_weight", f"{x}_proj_weight.") for x in "qkv"]
    projections.append(("out_proj.weight", "out_proj"))
    tensors, sites = {}, []
    for attr, prefix in projections:
        child, _, leaf = attr.rpartition(".")
        weight = stored(module.get_submodule(child), leaf)
        fan_out, fan_in = weight.shape
        like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        a = torch.empty(rank, fan_in, **like)
        b = torch.empty(fan_out, rank, **like)
        if device is None:
            initialise(a, b, spec.init, LINEAR, rank)
        if child:  # factors on the submodule itself, named there
            owner = join(path, child)
            tensors[(owner, "lora_A")], tensors[(owner, "lora_B")] = a, b
            names = ("lora_A", "lora_B")
        else:
            names = (f"{prefix}lora_A", f"{prefix}lora_B")
            tensors[names[0]], tensors[names[1]] = a, b
        sites.append(WeightSite(partial(lora_weight, LINEAR, scale), attr, names))
    note = f"via weights ({', '.join(site.attr for site in sites)})"
    return Part(path, tensors, sites, merge=partial(merged_by_sites, sites), note=note)
