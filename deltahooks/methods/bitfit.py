"""BitFit (Ben Zaken et al., 2021): train bias terms only, ``y = f(x) + Δb``.

An output site adds a zero-initialised ``Δb`` along the output's channel dimension; a
bias Parameter of a module that is no layer (``in_proj_bias``), or of a layer the model
reads without calling it, gets ``b + Δb`` through a weight site instead. A
layer with a bias merges ``Δb`` into it; a layer without one gets its bias from the
delta alone (the base module gains no attribute), so it cannot merge: folding it in
would add a tensor to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..direct_reads import WHY, merged_by_sites, needs_weight_site
from ..errors import UnsupportedModuleError
from ..layers import (
    CONV,
    CONV1D_GPT2,
    EMBEDDING,
    LINEAR,
    NORM,
    along_channels,
    channel_dim,
    kind_of,
    widths,
)
from ..ledger import is_reserved
from ..merging import stored
from ..sites import OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import ParameterPath, Target

TORCH_NORMS = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
"""Norm classes whose output channel dimension :func:`deltahooks.layers.channel_dim` knows
(the exact classes: a subclass may move its channels)."""

OWN_NORM = "via bias (a model's own norm layer: it adds its bias where it chooses)"


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def is_bias_name(name: str) -> bool:
    """A parameter named as a bias: ``bias``, ``in_proj_bias``, ``bias_k``, ..."""
    return "bias" in name.split("_")


def own_biases(module: nn.Module) -> list[str]:
    """The bias Parameters of a module no layer kind describes (``nn.MultiheadAttention``'s
    ``in_proj_bias``, a custom module's ``bias``), by name; one that is the same tensor as a
    bias of a layer inside it (a head that ties its ``bias`` to its decoder's) is that
    layer's, and left out.

    Example:
        >>> own_biases(torch.nn.MultiheadAttention(8, 2))
        ['in_proj_bias']
    """
    if kind_of(module) in BitFit.layer_kinds:
        return []
    inner = {
        id(layer.bias)
        for layer in module.modules()
        if layer is not module and kind_of(layer) in BitFit.layer_kinds and has_bias(layer)
    }
    return [
        name
        for name, tensor in module._parameters.items()
        if tensor is not None
        and is_bias_name(name)
        and not is_reserved(name)
        and tensor.is_floating_point()
        and id(tensor) not in inner
    ]


def layers_with_a_bias(path: str, module: nn.Module) -> bool:
    """BitFit's default targets: every bias the model has (the paper's): the layers of a
    known kind that have one, and the modules that hold bias Parameters of their own."""
    return (kind_of(module) in BitFit.layer_kinds and has_bias(module)) or bool(own_biases(module))


layers_with_a_bias.no_match_hint = (
    "BitFit's default trains the biases the model has, and it has none (Llama and T5 "
    "layers have no bias); name the layers that should get a new zero-initialised bias, "
    "e.g. BitFit(targets='all-linear')"
)


def add_to_tensor(tensor: torch.Tensor, tensors) -> torch.Tensor:
    """``b + Δb``: the weight site of a bias read in place."""
    (delta,) = tensors
    return tensor + delta


def add_bias(dim: int, module: nn.Module, x, y, tensors, writable):
    """``y + Δb`` along the channel dimension ``dim``, into ``y`` when ``writable``."""
    (bias,) = tensors
    if y.dim() < (-dim if dim < 0 else dim + 1) or y.shape[dim] != bias.shape[0]:
        raise UnsupportedModuleError(
            f"BitFit adds one value per channel ({bias.shape[0]}) along dimension {dim} of "
            f"{type(module).__name__}'s output, but that output has shape {tuple(y.shape)}: "
            "the layer keeps its channels elsewhere; exclude it from targets"
        )
    bias = along_channels(bias, dim, y.dim())
    if writable:
        return y.add_(bias)
    return y + bias.to(y.dtype)


def merged_bias(module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    bias = stored(module, "bias")
    exact = torch.promote_types(bias.dtype, torch.float32)
    return {"bias": (bias.to(exact) + tensors["bitfit_bias"].to(exact)).to(bias.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class BitFit(DeltaSpec):
    """Train a bias per target layer, added to its output: ``y = f(x) + Δb``.

    BitFit (Ben Zaken et al., 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models") trains only the model's bias terms. Here
    each target gets a delta ``Δb``, one value per output channel, starting at zero (the
    outputs are unchanged at attach) and added along the output's channel dimension (the
    last one; dimension ``C`` of a convolution's ``(N, C, ...)``). Training ``Δb`` is
    training the bias: ``delta.merge()`` folds it into the layer's own bias. A target
    without a bias (Llama's linear layers, RMSNorm) gets one from the delta, as
    OpenDelta's BitFit adds them; the base module gains no attribute, and merging such a
    delta raises :class:`deltahooks.UnsupportedOperationError`, since it would add a bias
    to the base model. PEFT has no BitFit. BitFit has no hyperparameters; its arguments
    are keyword-only.

    A layer the model reads without calling it (its parent's ``forward`` reads
    ``layer.weight`` itself, as transformers' Mamba does with ``dt_proj`` and torch's
    ``nn.MultiheadAttention`` with ``out_proj``; see :mod:`deltahooks.direct_reads`) gets
    the same update through a weight site instead, ``b ← b + Δb``, so it acts however the
    weight is read; ``dh.summary`` marks such parts "via weight". Such a layer without a
    bias of its own is refused (an added bias would not act). A norm layer of a model's own
    class (anything but torch's exact ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch and
    instance norms) that has a bias trains that bias in place the same way ("via bias"):
    such a norm adds its bias where it chooses (ConvNeXt's channels-first ``LayerNorm``,
    on dimension 1). A layer whose output does not hold its channels where the delta adds
    them raises :class:`deltahooks.UnsupportedModuleError` at its first call.

    Args:
        targets: which layers get a trained bias, in the target syntax of
            :func:`deltahooks.attach` (name suffix, glob, ``"re:"`` regex,
            ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of these).
            Each must be an ``nn.Linear``, transformers' GPT-2 ``Conv1D``,
            ``nn.Embedding``, ``nn.Conv1d/2d/3d`` or a normalisation layer (a module
            named ``*Norm*`` with a 1-D weight), or a module that holds bias Parameters
            of its own (named ``bias``, ``*_bias`` or ``bias_*``, e.g.
            ``nn.MultiheadAttention.in_proj_bias``: each trains as ``b + Δb`` through a
            weight site), or such a Parameter by its path (``"self_attn.in_proj_bias"``);
            any other module raises :class:`deltahooks.UnsupportedModuleError` at attach.
            Default: every bias the model has — each such layer that **has** a bias and
            every module's own bias Parameters (one tied to a layer inside the module
            counts once) — which is the paper's BitFit (all bias terms, layer-norm shifts
            included) and trains no new ones; on a model without
            biases (Llama, T5) the default matches nothing and attach raises
            :class:`deltahooks.TargetError` saying to name targets, e.g.
            ``targets="all-linear"``. OpenDelta's default picks the attention,
            feed-forward and layer-norm modules of known architectures and adds biases
            where they are missing (a new linear bias starts random there; every delta
            here starts at zero).
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> delta = dh.attach(model, dh.BitFit())
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.bitfit_bias': (3,), '1.bitfit_bias': (3,)}
    """

    method = "bitfit"
    layer_kinds = (LINEAR, CONV1D_GPT2, EMBEDDING, CONV, NORM)
    reads_weights = False
    parameter_targets = True
    targets: Target = layers_with_a_bias

    def check_module(self, path: str, module: nn.Module) -> None:
        if isinstance(path, ParameterPath):
            tensor = stored(module, path.name)
            if not (is_bias_name(path.name) and tensor.is_floating_point()):
                raise UnsupportedModuleError(
                    f"BitFit trains biases, and parameter {path!r} ({tensor.dtype}) is not a "
                    "floating bias; target a bias Parameter (a name such as 'bias', "
                    "'in_proj_bias') or the layer that owns it"
                )
            return
        if not self.takes_kind(module):
            if own_biases(module):
                return
            raise UnsupportedModuleError(
                f"BitFit cannot add a bias to {path or '<root>'!r} ({type(module).__name__}); "
                "it supports nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d, "
                "normalisation layers and modules with bias Parameters of their own. Narrow "
                "targets (e.g. exclude=...) or target the layers inside it"
            )
        width = widths(module)[1]
        if has_bias(module) and tuple(module.bias.shape) != (width,):
            raise UnsupportedModuleError(
                f"BitFit cannot adapt {path!r}: its bias has shape {tuple(module.bias.shape)}, "
                f"not one value per output channel ({width}); exclude it from targets"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        if isinstance(path, ParameterPath):  # one named tensor, e.g. "self_attn.in_proj_bias"
            return self._tensor_part(path.module_path, module, [path.name], device, path)
        if not self.takes_kind(module):  # its own bias Parameters
            return self._tensor_part(path, module, own_biases(module), device)
        direct = needs_weight_site(self, path, module, root)
        if direct and not has_bias(module):
            raise UnsupportedModuleError(
                f"BitFit cannot add a bias to {path!r} ({type(module).__name__}): the model "
                "reads its weight directly instead of calling it, so an added bias would not "
                "act, and it has no bias of its own to train; exclude it from targets"
            )
        bias = torch.zeros(widths(module)[1], **tensor_options(module, device))
        if direct:  # the model reads the bias without calling the layer: train it in place
            site = WeightSite(add_to_tensor, "bias", ("bitfit_bias",))
            return Part(path, {"bitfit_bias": bias}, [site], merge=merged_bias, note=WHY)
        if kind_of(module) == NORM and has_bias(module) and type(module) not in TORCH_NORMS:
            # a model's own norm adds its bias where it chooses (ConvNeXt's channels-first
            # LayerNorm on dim 1): train the bias itself rather than guess the channel dim
            site = WeightSite(add_to_tensor, "bias", ("bitfit_bias",))
            return Part(path, {"bitfit_bias": bias}, [site], merge=merged_bias, note=OWN_NORM)
        # a norm layer of a model's own making may keep its output for backward: never
        # write into it; the other kinds never do
        in_place = kind_of(module) != NORM
        # prepend: the bias is part of the layer, so other hooks on it (an Adapter) see it
        site = OutputSite(
            partial(add_bias, channel_dim(module)),
            ("bitfit_bias",),
            in_place=in_place,
            prepend=True,
        )
        if has_bias(module):
            return Part(path, {"bitfit_bias": bias}, [site], merge=merged_bias)
        return Part(
            path,
            {"bitfit_bias": bias},
            [site],
            cannot_merge=(
                f"{type(module).__name__} has no bias of its own, and merging would add one to "
                "the base model"
            ),
        )

    def _tensor_part(self, path, module, names, device, target=None) -> Part:
        """``b + Δb`` through a weight site on each named bias Parameter of ``module``."""
        tensors, sites = {}, []
        for name in names:
            current = stored(module, name)
            like = {"device": current.device if device is None else device}
            tensors[f"{name}.bitfit_bias"] = torch.zeros_like(current, **like)
            sites.append(WeightSite(add_to_tensor, name, (f"{name}.bitfit_bias",)))
        note = f"via {', '.join(names)}"
        return Part(
            path,
            tensors,
            sites,
            merge=partial(merged_by_sites, sites),
            target=target,
            note=note,
        )
