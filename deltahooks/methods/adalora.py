"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, ``y = f(x) + s · P(Λ ⊙ Q(dropout(x)))``,
whose rank budget shrinks during training.

The update is an output site (as LoRA's: at rank ``init_r`` the bypass costs far less
than rebuilding ``W``, measured below); ``P`` = ``lora_B`` (fan-out × r), ``Λ`` = ``lora_E`` (r × 1),
``Q`` = ``lora_A`` (r × fan-in), PEFT's names and layouts, and ``s = alpha / init_r``
as PEFT computes it. The rank schedule is training-loop state, so it lives outside the
delta, in :mod:`deltahooks.methods.adalora_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..direct_reads import WHY, needs_weight_site
from ..errors import SpecError, UnsupportedModuleError, warn
from ..layers import CONV, CONV1D_GPT2, LINEAR, kind_of, to_weight_layout, widths
from ..merging import stored
from ..sites import OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._lora_autograd import low_rank_update, pays_off

INITS = ("default", "random")
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


def update(kind: str, scale: float, dropout: float, module: nn.Module, x, y, tensors, writable):
    """``y + s · B((A ⊙ E) dropout(x))``; accumulated into ``y`` when ``writable``."""
    a, e, b = tensors
    dropping = bool(dropout) and module.training
    recording = torch.is_grad_enabled() and (a.requires_grad or x.requires_grad)
    own_path = dropping or (recording and pays_off(x))
    if own_path and kind != CONV and not torch.compiler.is_compiling():
        # LoRA's autograd path with A ⊙ E as its A: a dropout mask instead of a dropped
        # copy of x, and the faster backward layouts (see methods/_lora_autograd.py)
        return low_rank_update(x, y, a * e, b, scale, dropout if dropping else 0.0)
    if dropping:
        x = F.dropout(x, dropout, True)
    if kind == CONV:  # PEFT's form: the full-size update as a kernel
        kernel = (b @ (a * e)).reshape(module.weight.shape) * scale
        return y + module._conv_forward(x.to(a.dtype), kernel, None).to(y.dtype)
    h = F.linear(x.to(a.dtype), a * e)
    h = h.reshape(-1, h.shape[-1])
    if writable and y.dtype == h.dtype:
        y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scale)
        return y
    flat = torch.addmm(y.reshape(-1, y.shape[-1]).to(h.dtype), h, b.t(), alpha=scale)
    return flat.view(y.shape).to(y.dtype)


def updated_weight(kind: str, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + s · P diag(Λ) Q`` in the weight's layout: the weight site of a layer the model
    reads without calling it."""
    a, e, b = tensors
    if kind == CONV1D_GPT2:  # stored in × out
        return torch.addmm(weight, (a * e).t(), b.t(), alpha=scale)
    flat = torch.addmm(weight.flatten(1), b, a * e, alpha=scale)
    return flat.view_as(weight)


def merged_weight(scale: float, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    a, e, b = (tensors[k].to(exact) for k in ("lora_A", "lora_E", "lora_B"))
    update = to_weight_layout(module, b @ (a * e)) * scale
    return {"weight": (weight.to(exact) + update).to(weight.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class AdaLoRA(DeltaSpec):
    """SVD-form low-rank update with an adaptive rank budget, for Linear, GPT-2 Conv1D and
    Conv2d layers.

    AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning"; PEFT ``AdaLoraConfig``) adds ``s · P(Λ ⊙ Q x)`` to each target's output,
    with ``Q`` (``lora_A``, init_r × fan-in), ``Λ`` (``lora_E``, init_r × 1) and ``P``
    (``lora_B``, fan-out × init_r) trained, and ``s = alpha / (init_r + 1e-5)`` (PEFT's
    ``scaling / ranknum``). During training the rank budget falls from ``init_r`` per
    target to ``target_r`` on average on a cubic schedule: the allocator from
    :func:`deltahooks.adalora_allocator` zeroes the ``Λ`` entries of the least important
    triplets, and its ``orthogonality_loss()`` is the regulariser that keeps ``P`` and ``Q``
    near orthogonal. A training loop::

        allocator = dh.adalora_allocator(delta)
        for step in range(1, total_step + 1):
            loss = task_loss(model(batch)) + allocator.orthogonality_loss()
            loss.backward()
            optimizer.step()
            allocator.update_and_allocate(step)  # after step, before zero_grad (as PEFT)
            optimizer.zero_grad()

    Without the allocator, AdaLoRA trains as a fixed-rank SVD-form LoRA. The math, the
    initialisation, the schedule and the tensor names and layouts are PEFT's; tensors keep
    their ``init_r`` shape (a pruned triplet is a zero in ``Λ``), and ``delta.merge()``
    folds ``s · P diag(Λ) Q`` into the weight.

    A layer the model reads without calling it (its parent's ``forward`` reads
    ``layer.weight`` itself, as transformers' Mamba does with ``dt_proj`` and torch's
    ``nn.MultiheadAttention`` with ``out_proj``; see :mod:`deltahooks.direct_reads`) gets
    the same update through a weight site instead, ``W ← W + s · P diag(Λ) Q``, so it acts
    however the weight is read; ``dh.summary`` marks such parts "via weight". ``dropout``
    does not apply there (a warning says so).

    Args:
        targets: which layers get an update, in the target syntax of
            :func:`deltahooks.attach`. Required. PEFT: ``target_modules``. Each must be an
            ``nn.Linear``, transformers' GPT-2 ``Conv1D`` or an ``nn.Conv2d`` with
            ``groups=1`` (as PEFT); others raise :class:`deltahooks.UnsupportedModuleError`.
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
        init_r: the starting rank of every target. Default ``12``. PEFT: ``init_r``.
        target_r: the average rank the budget ends at (``target_r`` × number of targets
            triplets are kept), at most ``init_r``. Default ``8``. PEFT: ``target_r``.
        total_step: the number of training steps the schedule spans, a positive integer.
            Required (PEFT: ``total_step``, also required).
        tinit: warm-up steps before the budget starts to fall. Default ``0``. PEFT:
            ``tinit``.
        tfinal: final steps at the target budget, its mask fixed. Default ``0``. PEFT:
            ``tfinal``. ``tinit < total_step - tfinal`` must hold.
        deltaT: steps between two budget allocations in the falling phase. Default ``1``.
            PEFT: ``deltaT``.
        beta1: smoothing of the sensitivity (exponential moving average), in ``(0, 1)``.
            Default ``0.85``. PEFT: ``beta1``.
        beta2: smoothing of its uncertainty, in ``(0, 1)``. Default ``0.85``. PEFT:
            ``beta2``.
        orth_reg_weight: weight of the orthogonality regulariser in
            ``orthogonality_loss()``, ``>= 0``. Default ``0.5``. PEFT: ``orth_reg_weight``
            (PEFT adds it to ``outputs.loss`` inside its forward; here you add it).
        alpha: the scale numerator (``s = alpha / init_r``; ``0`` means ``init_r``, as
            PEFT). Default ``8.0``. PEFT: ``lora_alpha``.
        dropout: dropout probability on the update's input, in training mode, in
            ``[0, 1)``. Default ``0.0``. PEFT: ``lora_dropout``.
        init: ``"default"``: ``Λ`` zero, ``P`` and ``Q`` normal with std 0.02 (outputs
            unchanged at attach; PEFT ``init_lora_weights=True``). ``"random"``: all three
            standard normal (PEFT ``init_lora_weights=False``); for tests. Default
            ``"default"``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, dh.AdaLoRA(targets=torch.nn.Linear, init_r=4, target_r=2,
        ...                                     total_step=100))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items() if key[0] == "0"}
        {'0.lora_A': (4, 8), '0.lora_B': (8, 4), '0.lora_E': (4, 1)}
        >>> allocator = dh.adalora_allocator(delta)
        >>> allocator.budget(0), allocator.budget(50), allocator.budget(100)
        ((8, False), (4, True), (4, True))
    """

    method = "adalora"
    layer_kinds = (LINEAR, CONV1D_GPT2, CONV)
    reads_weights = False
    total_step: int
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.positive_int(self, "total_step", self.total_step, 1000)
        validate.positive_int(self, "init_r", self.init_r, 12)
        validate.positive_int(self, "target_r", self.target_r, 8)
        validate.positive_int(self, "deltaT", self.deltaT, 1)
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise SpecError(f"AdaLoRA {name}={value!r} must be an integer >= 0")
        if self.target_r > self.init_r:
            raise SpecError(
                f"AdaLoRA target_r={self.target_r} is above init_r={self.init_r}: the budget "
                "only falls; use target_r <= init_r"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise SpecError(
                f"AdaLoRA tinit={self.tinit}, tfinal={self.tfinal} leave no steps of "
                f"total_step={self.total_step} to reduce the rank in; lower tinit/tfinal or "
                "raise total_step"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (validate.is_number(value) and 0 < value < 1):
                raise SpecError(f"AdaLoRA {name}={value!r} must be a number in (0, 1)")
        validate.finite(self, "orth_reg_weight", self.orth_reg_weight, minimum=0)
        validate.finite(self, "alpha", self.alpha, minimum=0)
        validate.probability(self, "dropout", self.dropout)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        kind = kind_of(module)
        conv2d = isinstance(module, nn.Conv2d) and module.groups == 1
        if kind not in self.layer_kinds or (kind == CONV and not conv2d):
            raise UnsupportedModuleError(
                f"AdaLoRA cannot adapt {path or '<root>'!r} ({type(module).__name__}); it "
                "supports nn.Linear, transformers Conv1D and nn.Conv2d with groups=1 (as PEFT). "
                "Narrow targets (e.g. exclude=...) or target the linear layers inside it"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        fan_in, fan_out = widths(module)  # a conv's fan-in counts its kernel
        opts = tensor_options(module, device)
        r = self.init_r
        a = torch.zeros(r, fan_in, **opts)
        e = torch.zeros(r, 1, **opts)
        b = torch.zeros(fan_out, r, **opts)
        if self.real_build(device):
            with torch.no_grad():
                std = 1.0 if self.init == "random" else 0.02
                a.normal_(0.0, std)
                b.normal_(0.0, std)
                if self.init == "random":
                    e.normal_()
        scale = (self.alpha if self.alpha > 0 else float(r)) / (r + RANKNUM_EPS)
        # An output site, not a weight site: measured on CPU (train step, width 768, r=12),
        # the site is 1.5x (1024 tokens) to 2x (256 tokens) faster than rebuilding W + ΔW.
        names = ("lora_A", "lora_E", "lora_B")
        direct = needs_weight_site(self, path, module, root)
        if direct:  # the model reads the weight without calling the layer: update it there
            if self.dropout and device is None:
                warn(
                    f"AdaLoRA dropout={self.dropout} does not apply on {path!r}: the model "
                    "reads its weight directly, so the update is folded into the weight, "
                    "where dropout on the layer's input has no place"
                )
            site = WeightSite(partial(updated_weight, kind_of(module), scale), "weight", names)
        else:
            site = OutputSite(
                partial(update, kind_of(module), scale, self.dropout),
                names,
                in_place=True,
                prepend=True,
            )
        tensors = {"lora_A": a, "lora_B": b, "lora_E": e}
        return Part(
            path,
            tensors,
            [site],
            merge=partial(merged_weight, scale),
            note=WHY if direct else "",
        )
