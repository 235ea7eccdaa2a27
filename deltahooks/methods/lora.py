"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):

    ``y = f(x) + s · B(A(dropout(x)))``,  ``s = α/r`` (or ``α/√r``, rsLoRA)

An output site adds the bypass to the unchanged module's output; merging folds ``s · BA``
into the weight, so a merged forward costs what the base costs. Tensor layouts follow
PEFT (``A``: r × fan-in, ``B``: fan-out × r; for embeddings ``A``: r × num_embeddings,
``B``: embedding_dim × r) so files convert without transposes. Variants live beside it:
DoRA (``dora=True``) in :mod:`~deltahooks.methods.dora`, the inits (PiSSA, OLoRA) in
:mod:`~deltahooks.methods.lora_inits`, parameter targets in
:mod:`~deltahooks.methods.lora_parameters`, ``nn.MultiheadAttention`` in
:mod:`~deltahooks.methods.lora_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..direct_reads import WHY, needs_weight_site
from ..errors import UnsupportedModuleError, warn
from ..layers import CONV, CONV1D_GPT2, EMBEDDING, LINEAR, kind_of, widths
from ..sites import OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import ParameterPath
from . import _rank_patterns, lora_parameters
from ._lora_autograd import low_rank_update, pays_off
from ._lora_layouts import base_weight, delta_weight, lora_weight, warn_dropout
from .dora import dora_part
from .lora_attention import attention_part
from .lora_inits import INITS, RESIDUAL_INITS, check_residual_start, initialise, residual_start


def bypass(kind: str, scale: float, dropout: float, module: nn.Module, x, y, tensors, writable):
    """``y + s · B(A(dropout(x)))``; accumulated into ``y`` in place when ``writable``.

    In place, the update costs one GEMM and no copy (the layers LoRA adapts never keep
    their output for backward).
    """
    a, b = tensors
    if kind == EMBEDDING:
        return y + F.linear(F.embedding(x, a.t(), module.padding_idx), b) * scale
    recording = torch.is_grad_enabled() and (a.requires_grad or x.requires_grad)
    dropping = bool(dropout) and module.training
    own_path = dropping or (recording and pays_off(x))
    if own_path and kind != CONV and not torch.compiler.is_compiling():
        # its own autograd path: a mask, not a dropped copy per layer, and faster GEMM
        # layouts in backward; with dropout also taken without autograd, so that reentrant
        # checkpointing's no-grad first pass draws the masks its replay draws
        return low_rank_update(x, y, a, b, scale, dropout if dropping else 0.0)
    if dropping:
        x = F.dropout(x, dropout, True)
    if kind == CONV:
        conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
        return y + conv(module._conv_forward(x, a, None), b) * scale
    h = F.linear(x, a)
    h = h.reshape(-1, h.shape[-1])
    if writable and not recording:  # in place saves a copy at inference, costs in training
        y.view(-1, y.shape[-1]).addmm_(h, b.t(), alpha=scale)
        return y
    return torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=scale).view(y.shape)


def merged_weight(scale: float, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    weight = base_weight(module, tensors)
    update = delta_weight(scale, module, tensors)
    return {"weight": (weight.to(update.dtype) + update).to(weight.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class LoRA(DeltaSpec):
    """Low-rank update of Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d (groups=1) layers.

    LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds
    ``s · B(A(dropout(x)))`` to each target's output, with ``A`` (r × fan-in) and ``B``
    (fan-out × r) trained and the layer's own weight frozen; ``s = alpha / r``. The
    defaults are PEFT's ``LoraConfig`` defaults, and a saved delta uses PEFT's tensor
    layouts. ``delta.merge()`` folds ``s · BA`` into the weight. Every argument is
    keyword-only and checked when the spec is created: a bad value raises
    :class:`deltahooks.SpecError` at once, before any model is touched.

    A layer the model reads without calling it (its parent's ``forward`` reads
    ``layer.weight`` itself, as transformers' Mamba does with ``dt_proj`` and torch's
    ``nn.MultiheadAttention`` with ``out_proj``; see :mod:`deltahooks.direct_reads`) gets
    the same update through a weight site instead, ``W ← W + s · BA`` (DoRA: its rescaled
    weight), so it acts however the weight is read; ``dh.summary`` marks such parts "via
    weight". ``dropout`` does not apply there (a warning says so) and the PiSSA/OLoRA inits
    are refused. ``nn.MultiheadAttention`` is a target too: a pair on ``in_proj_weight`` (or
    on each of ``q/k/v_proj_weight``) and one on ``out_proj.weight``, as PEFT adapts it.

    Args:
        targets: which modules get an update, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"q_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required. PEFT: ``target_modules``. Each target must be an
            ``nn.Linear``, transformers' GPT-2 ``Conv1D``, ``nn.Embedding`` or
            ``nn.Conv1d/2d/3d`` with ``groups=1``; any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach. A string that matches
            no module may name a *parameter* instead (``"experts.gate_up_proj"``,
            ``"o_proj.weight"``; PEFT: ``target_parameters``): a 2-D weight (out × in)
            or a 3-D expert stack (experts × out × in, as transformers stores MoE
            experts) then reads ``W + s · BA`` through a weight site, with one ``A``
            (E × r × in) and ``B`` (E × out × r) per expert; ``dropout``, ``dora`` and
            the PiSSA/OLoRA inits are refused there (see
            :mod:`deltahooks.methods.lora_parameters`).
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.
        r: the rank of the update, a positive integer. Default ``8``. Paper: ``r``;
            PEFT: ``r``. The delta has ``r · (fan_in + fan_out)`` parameters per layer.
        alpha: the scale numerator: the update is multiplied by ``alpha / r`` (or
            ``alpha / √r`` with ``rslora``). A finite number ``>= 0``. Default ``8.0``
            (scale 1 at ``r=8``). Paper: ``α``; PEFT: ``lora_alpha``. When you change
            ``r``, keep ``alpha`` proportional (e.g. ``alpha = 2 · r``) to keep the
            update's size.
        dropout: dropout probability on the update's input ``x`` (the layer's own
            input is untouched), in ``[0, 1)``, active only in training mode; ignored for
            ``nn.Embedding``, whose input is token ids. Default ``0.0``. PEFT:
            ``lora_dropout``.
        rslora: scale by ``alpha / √r`` instead of ``alpha / r`` (rank-stabilised LoRA,
            Kalajdzievski 2023), which keeps learning stable at large ranks. Default
            ``False``. PEFT: ``use_rslora``.
        init: how ``A`` and ``B`` start. ``"default"`` (PEFT
            ``init_lora_weights=True``): ``A`` Kaiming-uniform and ``B`` zero, so the
            model's outputs are unchanged at attach (for ``nn.Embedding`` the roles swap:
            ``A`` zero, ``B`` standard normal, as PEFT does). ``"gaussian"`` (PEFT
            ``init_lora_weights="gaussian"``): ``A`` normal with standard deviation
            ``1/r``, ``B`` zero (roles swapped for embeddings): also unchanged at attach.
            ``"random"``: both factors non-zero, so the delta changes the outputs from
            the start; meant for tests (roughly PEFT ``init_lora_weights=False``).
            ``"pissa"`` (Meng et al., 2024, "PiSSA: Principal Singular Values and
            Singular Vectors Adaptation"; PEFT ``init_lora_weights="pissa"``): ``A`` and
            ``B`` start at the top-``r`` singular triplets of ``W``
            (``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``) and the layer computes with the
            residual ``W - sBA`` while attached, so the outputs equal the base model's at
            attach (within float rounding). ``"olora"`` (Büyükakyüz, 2024, "OLoRA:
            Orthonormal Low-Rank Adaptation"; PEFT ``init_lora_weights="olora"``): the
            same with ``W = QR``, ``B = Q_r``, ``A = R_r``. For both the base weight
            itself is never written: the residual is a buffer the layer reads instead
            (one more weight-sized tensor per layer), rebuilt from the base weight when a
            saved delta is loaded (not stored in the file), and ``detach()`` leaves the
            untouched base weight. Linear and GPT-2 Conv1D only; ``r`` at most the
            weight's full rank. Default ``"default"``.
        rank_pattern: per-target rank overrides, ``{pattern: rank}``, e.g.
            ``{"down_proj": 4}``. Keys use the target syntax (suffix, glob, ``"re:"``,
            ...); for each target the first key that matches it wins, and targets no
            key matches use ``r``. Values are positive integers. Default ``{}``. PEFT:
            ``rank_pattern``.
        alpha_pattern: per-target ``alpha`` overrides, ``{pattern: alpha}``, matched
            like ``rank_pattern``; values are finite numbers ``>= 0``. Default ``{}``.
            PEFT: ``alpha_pattern``.
        dora: weight-decomposed LoRA (DoRA; Liu et al., 2024, "DoRA: Weight-Decomposed
            Low-Rank Adaptation"): each output channel of ``W + sBA`` is rescaled to a
            trained magnitude, ``W' = m ⊙ (W + sBA) / ‖W + sBA‖``, with the norm taken per
            output channel and treated as a constant in backward (the paper's section
            4.3, as PEFT does). ``m`` (``lora_magnitude_vector``, PEFT's name and shape:
            one value per output channel, ``(1, C, 1, …)`` for convolutions) starts at
            ``‖W + sBA‖``, so with ``init="default"`` the outputs are unchanged at attach.
            Costs one ``out × in`` temporary per layer and forward (the norm) on top of
            LoRA. ``delta.merge()`` writes ``W'``. Default ``False``. PEFT: ``use_dora``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> spec = dh.LoRA(targets=torch.nn.Linear, r=2, alpha=4, rank_pattern={"1": 1})
        >>> delta = dh.attach(model, spec)
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.lora_A': (2, 4), '0.lora_B': (4, 2), '1.lora_A': (1, 4), '1.lora_B': (4, 1)}
        >>> experts = torch.nn.Module()
        >>> experts.stack = torch.nn.Parameter(torch.randn(3, 6, 5))  # 3 experts, 5 → 6
        >>> model = torch.nn.Sequential(experts)
        >>> delta = dh.attach(model, dh.LoRA(targets=["stack"], r=2))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.stack.lora_A': (3, 2, 5), '0.stack.lora_B': (3, 6, 2)}
    """

    method = "lora"
    layer_kinds = (LINEAR, CONV1D_GPT2, EMBEDDING, CONV)
    parameter_targets = True
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["default", "gaussian", "random", "pissa", "olora"] = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dora: bool = False

    def validate(self) -> None:
        _rank_patterns.validate_rank_and_alpha(self)
        validate.probability(self, "dropout", self.dropout)
        validate.flag(self, "rslora", self.rslora)
        validate.one_of(self, "init", self.init, INITS)
        validate.flag(self, "dora", self.dora)

    def check_module(self, path: str, module: nn.Module) -> None:
        if isinstance(path, ParameterPath):
            lora_parameters.check(self, path, module)
            return
        kind = kind_of(module)
        if isinstance(module, nn.MultiheadAttention):
            return
        if kind not in self.layer_kinds:
            raise UnsupportedModuleError(
                f"LoRA cannot adapt {path!r} ({type(module).__name__}); it supports nn.Linear, "
                "transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Narrow targets "
                "(e.g. add exclude=...) or target the linear layers inside it"
            )
        if self.init in RESIDUAL_INITS and kind not in (LINEAR, CONV1D_GPT2):
            raise UnsupportedModuleError(
                f"LoRA init={self.init!r} cannot start {path!r} ({type(module).__name__}): it "
                "decomposes a 2-D weight matrix, so it supports nn.Linear and transformers "
                "Conv1D; exclude it or use another init"
            )
        if kind == CONV and module.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA on grouped convolution {path!r} (groups={module.groups}) is not "
                "supported; exclude it from targets"
            )

    def reads_weight(self, path: str, module: nn.Module) -> bool:
        """Plain LoRA reads only the layer's input and output, so it adapts quantized layers
        (QLoRA); DoRA (the weight's norm), PiSSA/OLoRA (its decomposition) and parameter
        targets (a weight site) read the weight."""
        return (
            isinstance(path, ParameterPath)
            or isinstance(module, nn.MultiheadAttention)
            or self.dora
            or self.init in RESIDUAL_INITS
        )

    def rank_and_scale(self, path: str, module: nn.Module, root: nn.Module) -> tuple[int, float]:
        """The rank and the scale ``s`` (``alpha / r`` or ``alpha / √r``) of the update on
        ``path``, after ``rank_pattern`` and ``alpha_pattern``.

        Example:
            >>> import torch, deltahooks as dh
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> dh.LoRA(targets=["0"], r=2, alpha=8).rank_and_scale("0", model[0], model)
            (2, 4.0)
        """
        return _rank_patterns.rank_and_scale(self, path, module, root, rslora=self.rslora)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        if isinstance(path, ParameterPath):
            return lora_parameters.make_part(self, path, module, root, device=device)
        if isinstance(module, nn.MultiheadAttention):
            return attention_part(self, path, module, root, device)
        rank, scale = self.rank_and_scale(path, module, root)
        kind = kind_of(module)
        direct = needs_weight_site(self, path, module, root)
        if self.init in RESIDUAL_INITS:
            check_residual_start(self.init, path, root, direct, rank, widths(module))
        weight = module.weight
        like = tensor_options(module, device)  # a quantized layer's compute dtype
        fan_in, fan_out = widths(module)  # its real widths, not its packed storage's
        if kind == CONV:  # A is a convolution kernel, B a 1×…×1 one
            a = torch.empty(rank, *weight.shape[1:], **like)
            b = torch.empty(fan_out, rank, *([1] * (weight.dim() - 2)), **like)
        else:
            a = torch.empty(rank, fan_in, **like)
            b = torch.empty(fan_out, rank, **like)
        full_rank = min(fan_in, fan_out)
        if self.real_build(device):
            if rank > full_rank:
                warn(
                    f"LoRA rank {rank} on {path!r} exceeds the full rank {full_rank} of its "
                    f"{fan_out} x {fan_in} weight: the extra {rank - full_rank} directions add "
                    f"parameters but no expressiveness; use r <= {full_rank} (or rank_pattern) "
                    "for this layer"
                )
            if self.init not in RESIDUAL_INITS:
                initialise(a, b, self.init, kind, rank)
        dropout = 0.0 if kind == EMBEDDING else self.dropout
        if direct:
            warn_dropout(path, dropout, device)
        tensors = {"lora_A": a, "lora_B": b}
        extra: dict = {}
        if self.init in RESIDUAL_INITS:
            build = device is None
            extra = residual_start(path, tensors, weight, self.init, kind, scale, like, build)
        if self.dora:
            return dora_part(path, module, tensors, kind, scale, dropout, device, extra, direct)
        if direct:  # the model reads the weight without calling the layer: a hook never fires
            site = WeightSite(partial(lora_weight, kind, scale), "weight", ("lora_A", "lora_B"))
            return Part(path, tensors, [site], merge=partial(merged_weight, scale), note=WHY)
        # prepend: the update is part of the layer, so it runs before any other forward
        # hook of the module (an Adapter on the same output sees base + update, merged or not)
        site = OutputSite(
            partial(bypass, kind, scale, dropout), ("lora_A", "lora_B"), in_place=True, prepend=True
        )
        return Part(
            path,
            tensors,
            [*extra.get("sites", []), site],
            merge=partial(merged_weight, scale),
            unsaved=extra.get("unsaved", ()),
        )
