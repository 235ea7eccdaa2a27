"""BitFit (Ben Zaken et al., 2021): train bias terms only, ``y = f(x) + Δb``.

An output site adds a zero-initialised ``Δb`` along the output's channel dimension. A
layer with a bias merges ``Δb`` into it; a layer without one gets its bias from the
delta alone (the base module gains no attribute), so it cannot merge: folding it in
would add a tensor to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

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
from ..merging import stored
from ..sites import OutputSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import Target

KINDS = (LINEAR, CONV1D_GPT2, EMBEDDING, CONV, NORM)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def layers_with_a_bias(path: str, module: nn.Module) -> bool:
    """BitFit's default targets: every layer of a known kind that has a bias (the paper's)."""
    return kind_of(module) in KINDS and has_bias(module)


layers_with_a_bias.no_match_hint = (
    "BitFit's default trains the biases the model has, and it has none (Llama and T5 "
    "layers have no bias); name the layers that should get a new zero-initialised bias, "
    "e.g. BitFit(targets='all-linear')"
)


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

    Args:
        targets: which layers get a trained bias, in the target syntax of
            :func:`deltahooks.attach` (name suffix, glob, ``"re:"`` regex,
            ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of these).
            Each must be an ``nn.Linear``, transformers' GPT-2 ``Conv1D``,
            ``nn.Embedding``, ``nn.Conv1d/2d/3d`` or a normalisation layer (a module
            named ``*Norm*`` with a 1-D weight); any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach. Default: every such
            layer that **has** a bias, which is the paper's BitFit (all bias terms,
            layer-norm shifts included) and trains no new ones; on a model without
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
    targets: Target = layers_with_a_bias

    def reads_weight(self, path: str, module: nn.Module) -> bool:
        """False: it reads only the layer's input and output, so quantized layers take it."""
        return False

    def check_module(self, path: str, module: nn.Module) -> None:
        if kind_of(module) not in KINDS:
            raise UnsupportedModuleError(
                f"BitFit cannot add a bias to {path or '<root>'!r} ({type(module).__name__}); "
                "it supports nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d and "
                "normalisation layers. Narrow targets (e.g. exclude=...) or target the layers "
                "inside it"
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
        bias = torch.zeros(widths(module)[1], **tensor_options(module, device))
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


def add_bias(dim: int, module: nn.Module, x, y, tensors, writable):
    """``y + Δb`` along the channel dimension ``dim``, into ``y`` when ``writable``."""
    (bias,) = tensors
    bias = along_channels(bias, dim, y.dim())
    if writable:
        return y.add_(bias)
    return y + bias.to(y.dtype)


def merged_bias(module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    bias = stored(module, "bias")
    exact = torch.promote_types(bias.dtype, torch.float32)
    return {"bias": (bias.to(exact) + tensors["bitfit_bias"].to(exact)).to(bias.dtype)}
