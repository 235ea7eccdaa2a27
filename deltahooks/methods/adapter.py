"""Bottleneck adapter (Houlsby et al., 2019): ``y = f(x) + s · up(act(down(f(x))))``.

Sits on a module's output as a forward hook, with a residual connection, so any module
whose output is a ``(..., hidden)`` tensor can carry one. ``up`` starts at zero, so the
model is unchanged at attach. The update is non-linear in the output: it cannot be
folded into weights, so ``merge()`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, UnsupportedModuleError
from ..ledger import Ledger
from ..spec import (
    DeltaSpec,
    DeviceLike,
    Part,
    Switch,
    explain_failure,
    is_count,
    is_number,
    register_method,
)
from ..targets import is_conv1d_gpt2

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
INITS = ("default", "random")


def output_width(module: nn.Module) -> int | None:
    """The last-dimension size of a module's output, where its type tells it."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d_gpt2(module):
        return module.nf
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    return None


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
    bottleneck: int = 64
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    scale: float = 1.0
    hidden_size: int | None = None
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        if not is_count(self.bottleneck):
            raise SpecError(
                f"Adapter bottleneck={self.bottleneck!r} must be a positive integer, e.g. 64"
            )
        if self.activation not in ACTIVATIONS:
            raise SpecError(
                f"Adapter activation={self.activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if not is_number(self.scale) or not math.isfinite(self.scale):
            raise SpecError(f"Adapter scale={self.scale!r} must be a finite number")
        if self.hidden_size is not None and not is_count(self.hidden_size):
            raise SpecError(f"Adapter hidden_size={self.hidden_size!r} must be a positive integer")
        if self.init not in INITS:
            raise SpecError(f"Adapter init={self.init!r} is unknown; choose one of {list(INITS)}")

    def _width(self, module: nn.Module) -> int | None:
        return self.hidden_size if self.hidden_size is not None else output_width(module)

    def check_module(self, path: str, module: nn.Module) -> None:
        width = self._width(module)
        known = output_width(module)
        if known is not None and width != known:
            raise SpecError(
                f"Adapter hidden_size={width} does not fit {path!r} ({type(module).__name__}), "
                f"whose output is {known} wide; drop hidden_size=... (it is read from the module)"
            )
        if width is None:
            raise UnsupportedModuleError(
                f"Adapter cannot tell the output width of {path!r} ({type(module).__name__}); "
                "pass hidden_size=... (the size of its output's last dimension)"
            )
        if self.bottleneck > width:
            raise SpecError(
                f"Adapter bottleneck={self.bottleneck} is larger than the hidden size {width} of "
                f"{path!r}: a bottleneck must be narrower than its input; use bottleneck <= {width}"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> AdapterPart:
        width = self._width(module)
        weight = next(module.parameters(), None)
        like = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        if device is not None:
            like["device"] = device
        down = torch.empty(self.bottleneck, width, **like)
        up = torch.zeros(width, self.bottleneck, **like)
        if device is None:  # a real build; a plan (device="meta") needs shapes only
            with torch.no_grad():
                nn.init.kaiming_uniform_(down, a=math.sqrt(5))
                if self.init == "random":
                    nn.init.normal_(up, std=1.0 / math.sqrt(self.bottleneck))
        tensors = {
            (path, "adapter_down"): (down, True),
            (path, "adapter_down_bias"): (torch.zeros(self.bottleneck, **like), True),
            (path, "adapter_up"): (up, True),
            (path, "adapter_up_bias"): (torch.zeros(width, **like), True),
        }
        return AdapterPart(path, tensors, self.activation, float(self.scale))


class _Residual:
    """The forward hook: ``y + s · up(act(down(y)))``."""

    __slots__ = ("activation", "names", "scale", "switch")

    def __init__(self, switch: Switch, names: tuple[str, ...], activation: str, scale: float):
        self.switch = switch
        self.names = names
        self.activation = activation
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple, output):
        if not self.switch.active:
            return None
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModuleError(
                f"Adapter needs a tensor output, but {type(module).__name__} returned "
                f"{type(output).__name__}; target a submodule that returns a tensor"
            )
        params = module._parameters
        down, down_bias, up, up_bias = (params[name] for name in self.names)
        if down.is_meta and not output.is_meta:  # torch would compute garbage, not raise
            raise explain_failure(self.switch.name, module, output, (down,), None)
        try:
            hidden = ACTIVATIONS[self.activation](F.linear(output, down, down_bias))
            return output + F.linear(hidden, up, up_bias) * self.scale
        except (RuntimeError, NotImplementedError) as err:
            raise explain_failure(self.switch.name, module, output, (down, up), err) from err


class AdapterPart(Part):
    def __init__(self, path, tensors, activation: str, scale: float) -> None:
        super().__init__(path, tensors)
        self.activation = activation
        self.scale = scale

    def install_hooks(self, ledger: Ledger, switch: Switch) -> None:
        names = tuple(entry.reserved for entry in self.entries)
        hook = _Residual(switch, names, self.activation, self.scale)
        self.hooks.append(ledger.forward_hook(self.path, hook))

    def merge(self, ledger: Ledger) -> None:
        raise NotImplementedError(
            f"an Adapter (on {self.path!r}) is non-linear in the module's output, so it cannot "
            "be folded into weights; keep the delta unmerged"
        )
