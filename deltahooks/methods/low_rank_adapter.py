"""Low-rank adapter (Mahabadi et al., 2021): a bottleneck adapter whose matrices are rank-r.

``y = f(x) + up(act(down(f(x))))`` with ``down = u_d v_dᵀ`` and ``up = u_u v_uᵀ``. An output
site; ``u_u`` starts at zero, so the model is unchanged at attach. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
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


def low_rank(activation: str, module: nn.Module, x, y, tensors, writable):
    """``y + up(act(down(y)))`` with ``down = u_d v_dᵀ``, ``up = u_u v_uᵀ``."""
    down_u, down_v, down_bias, up_u, up_v, up_bias = tensors
    return bottleneck(
        module, activation, 1.0, y, y, down_u @ down_v.T, down_bias, up_u @ up_v.T, up_bias
    )


@register_method
@dataclass(frozen=True, kw_only=True)
class LowRankAdapter(DeltaSpec):
    """A sequential bottleneck adapter whose down/up matrices are rank-``rank`` products.

    The "Low-Rank Adapter" baseline of Mahabadi et al., 2021 ("Compacter: Efficient
    Low-Rank Hypercomplex Adapter Layers"; OpenDelta ``LowRankAdapterModel``): each
    target's output ``y`` (a ``(..., hidden)`` tensor, or the first element of a tuple)
    becomes ``y + up(act(down(y)))`` where ``down = u_d · v_dᵀ`` (bottleneck × hidden) and
    ``up = u_u · v_uᵀ`` (hidden × bottleneck), each with a bias; the bottleneck is
    ``hidden // reduction_factor`` (at least 1). About ``2 · (hidden + bottleneck) · rank
    + hidden + bottleneck`` parameters per target. ``delta.merge()`` raises
    :class:`deltahooks.UnsupportedOperationError`.

    Args:
        targets: the modules whose output gets an adapter, in the target syntax of
            :func:`deltahooks.attach`. Required. Houlsby placement in a BERT-style model:
            ``["output.dense"]`` (after the attention projection and the FFN).
            Convolutions raise :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        reduction_factor: hidden width / bottleneck width, a positive integer. Default
            ``32`` (OpenDelta's default).
        rank: the rank of each factorised matrix, a positive integer. Default ``1``
            (OpenDelta ``low_rank_rank``; the paper's setting).
        activation: ``"gelu"`` (default; OpenDelta uses the tanh approximation
            ``gelu_new``), ``"relu"``, ``"tanh"`` or ``"silu"``.
        hidden_size: the width of the target's output when the module type does not
            tell it. Default ``None``: read from the layer (Linear, Conv1D, Embedding,
            norm), else the module's last Linear/Conv1D, else ``config.hidden_size``,
            else :class:`deltahooks.SpecError` at attach.

    Initialisation: the factors are drawn so that ``down`` starts with the variance of
    a default ``nn.Linear`` weight, and ``u_u`` and both biases start at zero, so outputs
    are unchanged at attach (OpenDelta starts both matrices Glorot-uniform, which is not
    an identity).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 64))
        >>> delta = dh.attach(model, dh.LowRankAdapter(targets=["0"]))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}["0.lowrank_down_u"]
        (2, 1)
    """

    method = "low_rank_adapter"
    reads_weights = False
    reduction_factor: int = 32
    rank: int = 1
    activation: Literal["relu", "gelu", "tanh", "silu"] = "gelu"
    hidden_size: int | None = None

    def validate(self) -> None:
        validate.positive_int(self, "reduction_factor", self.reduction_factor, 32)
        validate.positive_int(self, "rank", self.rank, example=1)
        validate.one_of(self, "activation", self.activation, sorted(ACTIVATIONS))
        validate.optional_positive_int(self, "hidden_size", self.hidden_size, 768)

    def check_module(self, path: str, module: nn.Module) -> None:
        refuse_kinds(self, path, module)
        check_hidden_size(self, self.hidden_size, path, module)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        width = hidden_width(path, module, root, self.hidden_size)
        size = reduced(width, self.reduction_factor)
        opts = tensor_options(module, device)
        tensors = {
            "lowrank_down_u": torch.empty(size, self.rank, **opts),
            "lowrank_down_v": torch.empty(width, self.rank, **opts),
            "lowrank_down_bias": torch.zeros(size, **opts),
            "lowrank_up_u": torch.zeros(width, self.rank, **opts),
            "lowrank_up_v": torch.empty(size, self.rank, **opts),
            "lowrank_up_bias": torch.zeros(width, **opts),
        }
        if self.real_build(device):
            init_factors(tensors["lowrank_down_u"], tensors["lowrank_down_v"], width)
            init_factors(tensors["lowrank_up_u"], tensors["lowrank_up_v"], size)
            tensors["lowrank_up_u"].zero_()  # up = 0: the model is unchanged at attach
        site = OutputSite(partial(low_rank, self.activation), tuple(tensors))
        cannot = "a LowRankAdapter is non-linear in the module's output"
        return Part(path, tensors, [site], cannot_merge=cannot)
