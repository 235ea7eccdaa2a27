"""Bottleneck adapter (Houlsby et al., 2019): ``y = f(x) + s · up(act(down(f(x))))``.

An output site on any module whose output (or its first element, for layers that return
tuples) is a ``(..., hidden)`` tensor. ``up`` starts at zero, so the model is unchanged at
attach. The update is non-linear in the output, so it cannot be merged into weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from torch import nn

from .. import validate
from ..layers import hidden_width
from ..sites import OutputSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._bottleneck import ACTIVATIONS, bottleneck, check_bottleneck, check_hidden_size, plain_pair

INITS = ("default", "random")


def residual(activation: str, scale: float, module: nn.Module, x, y, tensors, writable):
    """``y + s · up(act(down(y)))``."""
    return bottleneck(module, activation, scale, y, y, *tensors)


@register_method
@dataclass(frozen=True, kw_only=True)
class Adapter(DeltaSpec):
    """A bottleneck MLP added to a module's output (sequential adapter).

    The bottleneck adapter of Houlsby et al., 2019 ("Parameter-Efficient Transfer
    Learning for NLP"): each target's output ``y`` (a ``(..., hidden)`` tensor) becomes
    ``y + scale · up(act(down(y)))``, where ``down`` (hidden → bottleneck) and ``up``
    (bottleneck → hidden) are linear layers with biases. Houlsby et al. put one after
    the attention output projection and one after the feed-forward block of every
    layer; in a BERT-style model ``targets=["output.dense"]`` selects both. PEFT has no
    such adapter; AdapterHub calls it a sequential bottleneck adapter. The update is
    non-linear, so ``delta.merge()`` raises ``NotImplementedError``. Every argument is
    keyword-only and checked when the spec is created: a bad value raises
    :class:`deltahooks.SpecError` at once, before any model is touched.

    Args:
        targets: the modules whose output gets an adapter, in the target syntax of
            :func:`deltahooks.attach` (name suffix, glob, ``"re:"`` regex,
            ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of these).
            Required. The module must return a tensor whose last dimension is the
            hidden size (a module returning a tuple raises
            :class:`deltahooks.UnsupportedModuleError` at its first forward).
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        bottleneck: the width of the bottleneck (Houlsby's ``m``), a positive integer no
            larger than the target's hidden size (a wider one raises
            :class:`deltahooks.SpecError` at attach). Default ``64``. AdapterHub sets it
            through ``reduction_factor = hidden / bottleneck``. The delta has about
            ``2 · hidden · bottleneck`` parameters per target.
        activation: the non-linearity between ``down`` and ``up``: ``"relu"``,
            ``"gelu"``, ``"tanh"`` or ``"silu"``. Default ``"relu"``. AdapterHub:
            ``non_linearity``.
        scale: a finite number that multiplies the adapter's output before it is added
            to ``y``. Default ``1.0``. AdapterHub: ``scaling``.
        hidden_size: the size of the target output's last dimension, a positive
            integer. Default ``None``: read from the module (``out_features`` of
            ``nn.Linear``, ``nf`` of GPT-2 ``Conv1D``, ``embedding_dim`` of
            ``nn.Embedding``, the last of ``normalized_shape`` of ``nn.LayerNorm``).
            Needed for any other module (a whole attention block, an MLP, a custom
            module), which otherwise raises :class:`deltahooks.UnsupportedModuleError`
            at attach; when given, it is used for every target.
        init: how the adapter starts. ``"default"``: ``down`` Kaiming-uniform, ``up`` and
            both biases zero, so the adapter adds exactly zero and the model's outputs
            are unchanged at attach (Houlsby's near-identity start). ``"random"``:
            ``up`` starts normal instead of zero, so the outputs change from the start;
            meant for tests.
            Default ``"default"``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> delta = dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2))
        >>> sorted(delta.state_dict())
        ['0.adapter_down', '0.adapter_down_bias', '0.adapter_up', '0.adapter_up_bias']
        >>> x = torch.randn(3, 8)
        >>> with delta.disabled():
        ...     base = model(x)
        >>> torch.equal(model(x), base)  # "default" init: unchanged at attach
        True
    """

    method = "adapter"
    reads_weights = False
    bottleneck: int = 64
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    scale: float = 1.0
    hidden_size: int | None = None
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.positive_int(self, "bottleneck", self.bottleneck, example=64)
        validate.one_of(self, "activation", self.activation, sorted(ACTIVATIONS))
        validate.finite(self, "scale", self.scale)
        validate.optional_positive_int(self, "hidden_size", self.hidden_size, example=768)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        check_hidden_size(self, self.hidden_size, path, module)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        width = hidden_width(path, module, root, self.hidden_size)
        check_bottleneck(self, self.bottleneck, width, path)
        tensors = plain_pair(
            "adapter",
            width,
            width,
            self.bottleneck,
            tensor_options(module, device),
            build=device is None,
            random_up=self.init == "random",
        )
        site = OutputSite(partial(residual, self.activation, float(self.scale)), tuple(tensors))
        return Part(
            path,
            tensors,
            [site],
            cannot_merge="an Adapter is non-linear in the module's output",
        )
