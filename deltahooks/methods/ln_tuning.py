"""LN tuning (Zhao et al., 2023): train the scale and shift of normalisation layers.

Weight sites make the norm's own forward read ``weight + Δw`` and ``bias + Δb``
(``torch.nn.utils.parametrize``; the base keys stay as they were), with both deltas
starting at zero. What PEFT's ``LNTuningConfig`` computes with trained copies of the
layers, as a difference from them; merging adds the differences to the weights.
Running statistics (BatchNorm's) are kept as copies, as PEFT's copied layer keeps them,
so training in train mode never changes the base model's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..layers import NORM, kind_of
from ..ledger import is_reserved
from ..merging import stored
from ..sites import RedirectSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import Target

AFFINE = (("weight", "ln_weight"), ("bias", "ln_bias"))  # (the norm's tensor, its delta)


def norm_layers(path: str, module: nn.Module) -> bool:
    """LNTuning's default targets: every normalisation layer."""
    return kind_of(module) == NORM


norm_layers.no_match_hint = (
    "LNTuning's default tunes every normalisation layer (a module named *Norm* with a 1-D "
    "weight), and this model has none; name the layers to tune with targets=..."
)


def _statistics(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The norm's own persistent buffers (running statistics), which train mode updates."""
    return [
        (name, buffer)
        for name, buffer in module._buffers.items()
        if buffer is not None
        and name not in module._non_persistent_buffers_set
        and not is_reserved(name)
    ]


def shifted(value: torch.Tensor, tensors) -> torch.Tensor:
    """``weight + Δw`` (or ``bias + Δb``): the norm's forward reads this."""
    (delta,) = tensors
    return value + delta


def merged_norm(statistics: tuple[str, ...], module: nn.Module, tensors) -> dict:
    """Deltas added into the stored weight and bias; the statistics' copies put in place."""
    values = {}
    for attr, local in AFFINE:
        if local in tensors:
            base = stored(module, attr)
            exact = torch.promote_types(base.dtype, torch.float32)
            values[attr] = (base.to(exact) + tensors[local].to(exact)).to(base.dtype)
    for name in statistics:
        values[name] = tensors[name].detach().clone()
    return values


@register_method
@dataclass(frozen=True, kw_only=True)
class LNTuning(DeltaSpec):
    """Tune the scale and shift of normalisation layers: ``γ + Δγ``, ``β + Δβ``.

    LN tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention: Towards Efficient
    Multi-Modal LLM Finetuning"; PEFT ``LNTuningConfig``) trains only the affine
    parameters of the normalisation layers. Each target's ``weight`` (and ``bias``, when
    it has one) is read as ``weight + Δw`` (``bias + Δb``) by its own forward, with the
    deltas starting at zero, so the outputs are unchanged at attach; ``delta.merge()``
    adds them into the weights. PEFT trains copies of the layers instead: the result is
    the same, with PEFT's trained values equal to base + delta. Running statistics
    (BatchNorm's ``running_mean``, ``running_var``, ``num_batches_tracked``) are held as
    copies that the layer updates in train mode, saved with the delta, so the base
    model's buffers never change. ``copy.deepcopy``, ``pickle`` and ``torch.save(model)``
    of a model with the delta attached give a working copy. LNTuning has no
    hyperparameters; its arguments are keyword-only.

    Args:
        targets: which normalisation layers to tune, in the target syntax of
            :func:`deltahooks.attach` (name suffix, glob, ``"re:"`` regex, module class,
            callable, ``dh.Paths``, or a list of these). Default: every normalisation
            layer, i.e. every module named ``*Norm*`` with a 1-D ``weight``:
            ``nn.LayerNorm``, ``nn.RMSNorm``, BatchNorm, GroupNorm and models' own
            (``LlamaRMSNorm``, ``T5LayerNorm``, ...). PEFT's ``target_modules`` default
            is a per-architecture list of the same layers. Any other module (or a norm
            without an affine weight) raises :class:`deltahooks.UnsupportedModuleError`
            at attach.
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> delta = dh.attach(model, dh.LNTuning())
        >>> sorted(delta.state_dict())
        ['1.ln_bias', '1.ln_weight']
        >>> list(model.state_dict())  # the base keys are unchanged while attached
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.dh__default__ln_weight', '1.dh__default__ln_bias']
    """

    method = "ln_tuning"
    targets: Target = norm_layers

    def check_module(self, path: str, module: nn.Module) -> None:
        if kind_of(module) != NORM:
            raise UnsupportedModuleError(
                f"LNTuning tunes normalisation layers, and {path or '<root>'!r} "
                f"({type(module).__name__}) is not one (or has no affine weight); narrow "
                "targets to the norm layers (the default selects all of them), or use BitFit "
                "/ IA3 / LoRA for other layers"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        options = tensor_options(module, device)
        tensors: dict = {}
        sites: list = []
        for attr, local in AFFINE:
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor):
                tensors[local] = torch.zeros(value.shape, **options)
                sites.append(WeightSite(shifted, attr, (local,)))
        statistics = _statistics(module)
        for name, buffer in statistics:
            copy = (
                buffer.detach().clone()
                if device is None
                else torch.empty_like(buffer, device=device)
            )
            tensors[(path, name)] = (copy, False)
        if statistics:
            sites.append(RedirectSite(tuple((path, name) for name, _ in statistics)))
        names = tuple(name for name, _ in statistics)
        return Part(path, tensors, sites, merge=partial(merged_norm, names))
