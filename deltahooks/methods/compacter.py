"""Compacter (Mahabadi et al., 2021): a bottleneck adapter of PHM layers, ``W = Σ_i A_i ⊗ B_i``.

The rules ``A_i`` (n × n) are shared by every target (stored once, on the root); each
layer's ``B_i = s_i t_iᵀ`` is rank-r. An output site; the up projection's ``s`` starts at
zero, so the model is unchanged at attach. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..errors import SpecError
from ..layers import hidden_width
from ..sites import OutputSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._bottleneck import (
    ACTIVATIONS,
    bottleneck,
    check_hidden_size,
    init_factors,
    reduced,
    refuse_kinds,
)


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ_i A_i ⊗ (s_i t_iᵀ)``: rules (n, n, n), ``s`` (n, rows, r), ``t`` (n, cols, r)."""
    n, rows, cols = rule.shape[0], s.shape[1], t.shape[1]
    return torch.einsum("iab,icr,idr->acbd", rule, s, t).reshape(n * rows, n * cols)


def compacter(activation: str, width: int, module: nn.Module, x, y, tensors, writable):
    """``y + up(act(down(y)))`` with PHM weights cut to the hidden width (the padding)."""
    rule_down, rule_up, down_s, down_t, down_bias, up_s, up_t, up_bias = tensors
    down = phm_weight(rule_down, down_s, down_t)[:, :width]
    up = phm_weight(rule_up, up_s, up_t)[:width]
    return bottleneck(module, activation, 1.0, y, y, down, down_bias, up, up_bias)


@register_method
@dataclass(frozen=True, kw_only=True)
class Compacter(DeltaSpec):
    """A sequential bottleneck adapter whose matrices are sums of Kronecker products.

    Mahabadi et al., 2021 ("Compacter: Efficient Low-Rank Hypercomplex Adapter Layers";
    OpenDelta ``CompacterModel``): each target's output ``y`` becomes
    ``y + up(act(down(y)))``, where ``down`` and ``up`` (with biases) are PHM layers
    ``W = Σ_{i=1..n} A_i ⊗ (s_i t_iᵀ)``, ``n = phm_dim``: the rules ``A_i`` (n × n) hold
    what all layers share, the rank-``phm_rank`` ``s_i t_iᵀ`` what is layer-specific.
    The bottleneck is ``hidden // reduction_factor`` rounded up to a multiple of ``n``.
    A hidden width that ``n`` does not divide is padded to the next multiple of ``n``:
    the PHM matrices are built at the padded width, ``down`` reads the hidden state as
    if zero-padded (its extra columns are dropped) and ``up``'s extra output rows are
    dropped, so the parameter count is that of the padded width. ``delta.merge()``
    raises :class:`deltahooks.UnsupportedOperationError`.

    Args:
        targets: the modules whose output gets an adapter, in the target syntax of
            :func:`deltahooks.attach`. Required. Houlsby placement in a BERT-style model:
            ``["output.dense"]``. Convolutions raise
            :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        reduction_factor: hidden width / bottleneck width, a positive integer. Default
            ``16`` (OpenDelta's default).
        phm_dim: ``n``, the number of Kronecker terms and the size of each rule, a
            positive integer no larger than any target's hidden width. Default ``4``
            (OpenDelta ``hypercomplex_division``; the paper's best setting).
        phm_rank: the rank of each ``B_i``, a positive integer. Default ``1`` (the paper).
        shared_phm_rule: one set of rules (``n³`` numbers, delta key ``"phm_rule"``)
            for the down and up layers of every target, as in the paper. Default
            ``True``. ``False`` (OpenDelta's default) gives each target its own
            ``phm_rule_down`` and ``phm_rule_up``.
        activation: ``"gelu"`` (default; the paper's code uses its tanh approximation
            ``gelu_new``, OpenDelta ``relu``), ``"relu"``, ``"tanh"`` or ``"silu"``.
        hidden_size: the width of the target's output when the module type does not
            tell it. Default ``None``: read from the layer, else the module's last
            Linear/Conv1D, else ``config.hidden_size``, else
            :class:`deltahooks.SpecError` at attach.

    Initialisation: rules standard normal, factors drawn so that ``down`` starts with the
    variance of a default ``nn.Linear`` weight; ``up``'s ``s`` and both biases start at
    zero, so outputs are unchanged at attach (OpenDelta draws small normal rules and
    Glorot-uniform factors for both layers, which is not an identity).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 64))
        >>> delta = dh.attach(model, dh.Compacter(targets=torch.nn.Linear))
        >>> tuple(delta.shared["phm_rule"].shape), tuple(delta.state_dict()["0.phm_down_t"].shape)
        ((4, 4, 4), (4, 16, 1))
    """

    method = "compacter"
    reads_weights = False
    reduction_factor: int = 16
    phm_dim: int = 4
    phm_rank: int = 1
    shared_phm_rule: bool = True
    activation: Literal["relu", "gelu", "tanh", "silu"] = "gelu"
    hidden_size: int | None = None

    def validate(self) -> None:
        validate.positive_int(self, "reduction_factor", self.reduction_factor, 16)
        validate.positive_int(self, "phm_dim", self.phm_dim, example=4)
        validate.positive_int(self, "phm_rank", self.phm_rank, example=1)
        validate.flag(self, "shared_phm_rule", self.shared_phm_rule)
        validate.one_of(self, "activation", self.activation, sorted(ACTIVATIONS))
        validate.optional_positive_int(self, "hidden_size", self.hidden_size, 768)

    def check_module(self, path: str, module: nn.Module) -> None:
        refuse_kinds(self, path, module)
        check_hidden_size(self, self.hidden_size, path, module)

    def _rule(self, opts: dict, device: DeviceLike) -> torch.Tensor:
        n = self.phm_dim
        return torch.empty(n, n, n, **opts) if device is not None else torch.randn(n, n, n, **opts)

    def make_shared(self, root, targets, *, device: DeviceLike = None) -> dict[str, torch.Tensor]:
        for path, module in targets:  # before n³ numbers are allocated, even on meta
            width = hidden_width(path, module, root, self.hidden_size)
            if self.phm_dim > width:
                raise SpecError(
                    f"Compacter phm_dim={self.phm_dim} is larger than the hidden width {width} "
                    f"of {path!r}; use phm_dim <= {width} (4 is the paper's choice)"
                )
        if not self.shared_phm_rule:
            return {}
        return {"phm_rule": self._rule(tensor_options(targets[0][1], device), device)}

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        n, rank = self.phm_dim, self.phm_rank
        width = hidden_width(path, module, root, self.hidden_size)
        padded = -(-width // n) * n
        size = reduced(width, self.reduction_factor, n)
        opts = tensor_options(module, device)
        tensors = {
            "phm_down_s": torch.empty(n, size // n, rank, **opts),
            "phm_down_t": torch.empty(n, padded // n, rank, **opts),
            "phm_down_bias": torch.zeros(size, **opts),
            "phm_up_s": torch.zeros(n, padded // n, rank, **opts),
            "phm_up_t": torch.empty(n, size // n, rank, **opts),
            "phm_up_bias": torch.zeros(width, **opts),
        }
        rules = ("phm_rule", "phm_rule")
        if not self.shared_phm_rule:
            tensors["phm_rule_down"] = self._rule(opts, device)
            tensors["phm_rule_up"] = self._rule(opts, device)
            rules = ("phm_rule_down", "phm_rule_up")
        if self.real_build(device):
            init_factors(tensors["phm_down_s"], tensors["phm_down_t"], padded, terms=n)
            init_factors(tensors["phm_up_s"], tensors["phm_up_t"], size, terms=n)
            tensors["phm_up_s"].zero_()  # up = 0: the model is unchanged at attach
        names = (*rules, *(k for k in tensors if not k.startswith("phm_rule")))
        site = OutputSite(partial(compacter, self.activation, width), names)
        cannot = "a Compacter is non-linear in the module's output"
        return Part(path, tensors, [site], cannot_merge=cannot)
