"""Parallel adapter (He et al., 2022): ``y = f(x) + s · up(act(down(x)))``.

An output site: the bottleneck reads the module's first input ``x``, which the hook gets
together with the output, so nothing is kept between hooks. ``up`` starts at zero, so the
model is unchanged at attach; the update is non-linear, so it cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from torch import nn

from .. import validate
from ..errors import UnsupportedModuleError
from ..layers import CONV, EMBEDDING, hidden_width, input_width
from ..sites import OutputSite, first_tensor
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._bottleneck import (
    ACTIVATIONS,
    bottleneck,
    check_bottleneck,
    check_hidden_size,
    plain_pair,
    refuse_kinds,
)

INITS = ("default", "random")


def parallel(activation: str, scale: float, module: nn.Module, x, y, tensors, writable):
    """``y + s · up(act(down(x)))``, with a clear error when ``x`` is not what was planned."""
    source = first_tensor(x)
    if source is None:
        raise UnsupportedModuleError(
            f"ParallelAdapter on {type(module).__name__} reads the module's first input, and it "
            "got no tensor; target a module whose first input is its (..., width) hidden state"
        )
    return bottleneck(module, activation, scale, source, y, *tensors)


@register_method
@dataclass(frozen=True, kw_only=True)
class ParallelAdapter(DeltaSpec):
    """A bottleneck MLP beside a module: it reads the module's input, adds to its output.

    He et al., 2022 ("Towards a Unified View of Parameter-Efficient Transfer Learning")
    found an adapter in parallel to a sublayer better than one after it: each target's
    output ``y`` becomes ``y + scale · up(act(down(x)))``, with ``x`` the module's first
    input. ``down`` (input width → bottleneck) and ``up`` (bottleneck → output width) are
    linear layers with biases. OpenDelta: ``ParallelAdapterModel``. Input and output may
    differ in width (a BERT ``output`` block reads the FFN's intermediate activations).
    ``delta.merge()`` raises :class:`deltahooks.UnsupportedOperationError`.

    Args:
        targets: the modules to run beside, in the target syntax of
            :func:`deltahooks.attach`. Required. Their first input and their output (or
            its first element, for layers that return tuples) must be ``(..., width)``
            tensors: ``nn.Embedding`` and convolutions raise
            :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        bottleneck: the width of the bottleneck, a positive integer no larger than the
            input width (else :class:`deltahooks.SpecError` at attach). Default ``64``;
            He et al. use 512 beside the FFN of 1024-wide models (OpenDelta's default
            ``bottleneck_dim`` is 24).
        scale: a finite number multiplying the update. Default ``1.0`` (OpenDelta
            ``scaled``); He et al.'s best FFN variant uses ``4``.
        activation: ``"relu"`` (default; He et al.'s ``f``), ``"gelu"``, ``"tanh"`` or
            ``"silu"``. OpenDelta's default is ``gelu_new`` (the tanh approximation).
        hidden_size: the width of the target's input and output when the module type
            does not tell it. Default ``None``: layer kinds tell their widths
            (``in_features``/``out_features`` of ``nn.Linear``, GPT-2 ``Conv1D``,
            norms); for other modules the input width is that of their first
            Linear/Conv1D and the output width that of their last, else the model's
            ``config.hidden_size``, else :class:`deltahooks.SpecError` at attach.
        init: ``"default"``: ``down`` Kaiming-uniform, ``up`` and both biases zero, so
            outputs are unchanged at attach; ``"random"``: ``up`` starts normal too
            (for tests).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> delta = dh.attach(model, dh.ParallelAdapter(targets=["0"], bottleneck=2))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}["0.parallel_down"]
        (2, 8)
    """

    method = "parallel_adapter"
    reads_weights = False
    bottleneck: int = 64
    scale: float = 1.0
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    hidden_size: int | None = None
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.positive_int(self, "bottleneck", self.bottleneck, example=64)
        validate.finite(self, "scale", self.scale)
        validate.one_of(self, "activation", self.activation, sorted(ACTIVATIONS))
        validate.optional_positive_int(self, "hidden_size", self.hidden_size, 768)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        refuse_kinds(self, path, module, (CONV, EMBEDDING))
        check_hidden_size(self, self.hidden_size, path, module)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        fan_in = input_width(path, module, root, self.hidden_size)
        fan_out = hidden_width(path, module, root, self.hidden_size)
        check_bottleneck(self, self.bottleneck, fan_in, path, "input width")
        tensors = plain_pair(
            "parallel",
            fan_in,
            fan_out,
            self.bottleneck,
            tensor_options(module, device),
            build=device is None,
            random_up=self.init == "random",
        )
        site = OutputSite(partial(parallel, self.activation, float(self.scale)), tuple(tensors))
        cannot = "a ParallelAdapter is non-linear in the module's input"
        return Part(path, tensors, [site], cannot_merge=cannot)
