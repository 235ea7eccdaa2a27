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

    ``hidden_size`` is needed only for modules whose output width their type does not
    tell (Linear, GPT-2 Conv1D, Embedding and LayerNorm do).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> delta = dh.attach(model, dh.Adapter(targets=["0"], bottleneck=2))
        >>> sorted(delta.state_dict())
        ['0.adapter_down', '0.adapter_down_bias', '0.adapter_up', '0.adapter_up_bias']
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
