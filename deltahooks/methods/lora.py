"""LoRA (Hu et al., 2021): ``y = f(x) + s · B(A(dropout(x)))``, with ``s = α/r`` (or ``α/√r``).

An output site adds the bypass to the unchanged module's output; merging folds ``s · BA``
into the weight, so a merged forward costs what the base costs. Tensor layouts follow
PEFT (``A``: r × fan-in, ``B``: fan-out × r; for embeddings ``A``: r × num_embeddings,
``B``: embedding_dim × r) so files convert without transposes.

DoRA (Liu et al., 2024) rescales each output channel of ``W + sBA`` to a learned
magnitude ``m``: ``W' = m ⊙ (W + sBA) / ‖W + sBA‖`` (norm per output channel, treated as
a constant in backward, as the paper's section 4.3 and PEFT do). It is computed on the
layer's output, like PEFT: ``y + (m/‖·‖ - 1) ⊙ (Wx) + (m/‖·‖) ⊙ sBAx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..direct_reads import WHY, merged_by_sites, needs_weight_site
from ..errors import DeltaStateError, SpecError, UnsupportedModuleError, warn
from ..layers import (
    CONV,
    CONV1D_GPT2,
    EMBEDDING,
    LINEAR,
    along_channels,
    channel_dim,
    is_norm,
    kind_of,
    to_weight_layout,
    widths,
)
from ..ledger import join
from ..merging import stored
from ..registry import registry_of
from ..sites import OutputSite, RedirectSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import ParameterPath, first_match
from . import lora_parameters
from ._lora_autograd import low_rank_update, pays_off

INITS = ("default", "gaussian", "random", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # the layer computes with W - sBA₀ while attached
KINDS = (LINEAR, CONV1D_GPT2, EMBEDDING, CONV)


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
        validate.pattern_dict("LoRA", "rank_pattern", self.rank_pattern, "{'down_proj': 4}")
        validate.pattern_dict("LoRA", "alpha_pattern", self.alpha_pattern, "{'down_proj': 16}")
        for where, rank in [("r", self.r), *self.rank_pattern.items()]:
            validate.positive_int("LoRA", where, rank)
        for where, alpha in [("alpha", self.alpha), *self.alpha_pattern.items()]:
            validate.finite("LoRA", where, alpha, minimum=0)
        validate.probability("LoRA", "dropout", self.dropout)
        validate.flag("LoRA", "rslora", self.rslora)
        validate.one_of("LoRA", "init", self.init, INITS)
        validate.flag("LoRA", "dora", self.dora)

    def check_module(self, path: str, module: nn.Module) -> None:
        if isinstance(path, ParameterPath):
            lora_parameters.check(self, path, module)
            return
        kind = kind_of(module)
        if isinstance(module, nn.MultiheadAttention):
            return
        if kind not in KINDS:
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
        rank = first_match(path, module, self.rank_pattern, root) or self.r
        alpha = first_match(path, module, self.alpha_pattern, root)
        alpha = self.alpha if alpha is None else alpha
        return rank, alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        if isinstance(path, ParameterPath):
            return lora_parameters.make_part(self, path, module, root, device=device)
        if isinstance(module, nn.MultiheadAttention):
            return self._attention_part(path, module, root, device)
        rank, scale = self.rank_and_scale(path, module, root)
        kind = kind_of(module)
        direct = needs_weight_site("LoRA", path, module, root)
        if direct and self.init in RESIDUAL_INITS:
            raise UnsupportedModuleError(
                f"LoRA init={self.init!r} cannot start {path!r}: the model reads its weight "
                "directly instead of calling it, so LoRA acts through the weight there, and "
                "the residual of PiSSA/OLoRA replaces that weight; exclude it (exclude=...) "
                "or use another init"
            )
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
        if self.init in RESIDUAL_INITS and rank > full_rank:
            raise SpecError(
                f"LoRA init={self.init!r} on {path!r} needs r <= {full_rank} (the full rank of "
                f"its {fan_out} x {fan_in} weight), got {rank}; lower r or use rank_pattern"
            )
        if device is None:  # a real build; a plan (device="meta") needs shapes only
            if rank > full_rank:
                warn(
                    f"LoRA rank {rank} on {path!r} exceeds the full rank {full_rank} of its "
                    f"{fan_out} x {fan_in} weight: the extra {rank - full_rank} directions add "
                    f"parameters but no expressiveness; use r <= {full_rank} (or rank_pattern) "
                    "for this layer"
                )
            if self.init not in RESIDUAL_INITS:
                _initialise(a, b, self.init, kind, rank)
        dropout = 0.0 if kind == EMBEDDING else self.dropout
        if direct:
            _warn_dropout(path, dropout, device)
        tensors = {"lora_A": a, "lora_B": b}
        extra: dict = {}
        if self.init in RESIDUAL_INITS:
            _refuse_merged_weight(path, root)
            # the residual W - sBA₀ is registered as "weight" and a redirect makes the
            # layer read it: the base parameter is never written, so detach is exact
            residual = torch.empty_like(weight, device=like["device"])
            if device is None:
                _decompose(a, b, residual, weight, self.init, kind, scale)
            tensors[(path, "weight")] = (residual, False)
            extra = {"sites": [RedirectSite(((path, "weight"),))], "unsaved": ["weight"]}
        if self.dora:
            return self._dora_part(
                path, module, tensors, kind, scale, dropout, device, extra, direct
            )
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

    def _dora_part(
        self, path, module, tensors, kind, scale, dropout, device, extra, direct=False
    ) -> Part:
        weight = tensors.get((path, "weight"), (module.weight,))[0]  # PiSSA's residual
        out = widths(module)[1]
        shape = (1, out, *([1] * (weight.dim() - 2))) if kind == CONV else (out,)
        like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        magnitude = torch.empty(shape, **like)
        if device is None:  # ‖W + sBA‖ per output channel: m / ‖·‖ = 1 at attach
            norm = weight_norm(kind, scale, weight, tensors["lora_A"], tensors["lora_B"])
            magnitude.copy_(norm.view(shape))
        tensors["lora_magnitude_vector"] = magnitude
        # An output site, not a weight site: W' as a parametrized weight would make
        # autograd form the full out × in gradient of W' (one more GEMM as large as the
        # forward's) in every training step; on the output the magnitude's gradient is a
        # per-channel reduction. Timed (CPU, 1 thread, 1024² Linear, 512 tokens, median of
        # 20 interleaved rounds): train step 1.6x slower as a weight site, forward 0.94-0.99x.
        names = ("lora_A", "lora_B", "lora_magnitude_vector")
        if direct:  # the model reads the weight without calling the layer
            site = WeightSite(partial(dora_weight, kind, scale), "weight", names)
        else:
            site = OutputSite(
                partial(dora_bypass, kind, scale, dropout), names, in_place=True, prepend=True
            )
        # a scale of the layer's channels: exact to merge only while no other unmerged
        # delta adds to the same layer (its update would be rescaled too, or not)
        return Part(
            path,
            tensors,
            [*extra.get("sites", []), site],
            merge=partial(dora_merged_weight, kind, scale),
            merge_order=2,
            exclusive_merge=True,
            unsaved=extra.get("unsaved", ()),
            note=WHY if direct else "",
        )

    def _attention_part(self, path: str, module: nn.MultiheadAttention, root, device) -> Part:
        """LoRA on torch's ``nn.MultiheadAttention``: weight sites on its input projection
        (``in_proj_weight``, or ``q/k/v_proj_weight`` when they are separate) and on
        ``out_proj.weight``, since ``F.multi_head_attention_forward`` reads them all
        without calling a layer. The input projection's factors sit on the module
        (``lora_A``/``lora_B``, or ``q_proj_weight.lora_A``, ...), ``out_proj``'s on it."""
        if self.dora or self.init in RESIDUAL_INITS:
            raise UnsupportedModuleError(
                f"LoRA {'dora=True' if self.dora else f'init={self.init!r}'} cannot adapt "
                f"{path!r} (nn.MultiheadAttention): it acts through the attention's weight "
                "tensors, which that setting does not support; target it with a separate "
                "dh.LoRA spec without it"
            )
        rank, scale = self.rank_and_scale(path, module, root)
        _warn_dropout(path, self.dropout, device)
        if module._qkv_same_embed_dim:
            projections = [("in_proj_weight", "")]
        else:
            projections = [(f"{x}_proj_weight", f"{x}_proj_weight.") for x in "qkv"]
        projections.append(("out_proj.weight", "out_proj"))
        tensors, sites = {}, []
        for attr, prefix in projections:
            child, _, leaf = attr.rpartition(".")
            weight = stored(module.get_submodule(child), leaf)
            fan_out, fan_in = weight.shape
            like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
            a = torch.empty(rank, fan_in, **like)
            b = torch.empty(fan_out, rank, **like)
            if device is None:
                _initialise(a, b, self.init, LINEAR, rank)
            if child:  # factors on the submodule itself, named there
                owner = join(path, child)
                tensors[(owner, "lora_A")], tensors[(owner, "lora_B")] = a, b
                names = ("lora_A", "lora_B")
            else:
                names = (f"{prefix}lora_A", f"{prefix}lora_B")
                tensors[names[0]], tensors[names[1]] = a, b
            sites.append(WeightSite(partial(lora_weight, LINEAR, scale), attr, names))
        note = f"via weights ({', '.join(site.attr for site in sites)})"
        return Part(path, tensors, sites, merge=partial(merged_by_sites, sites), note=note)


@torch.no_grad()
def _initialise(a: torch.Tensor, b: torch.Tensor, init: str, kind: str, rank: int) -> None:
    # The zero factor makes the delta start at exactly zero; for embeddings it is A
    # (PEFT's convention), since A is what the token ids index.
    first, second = (b, a) if kind == EMBEDDING else (a, b)
    if init == "default":
        if kind == EMBEDDING:
            nn.init.normal_(first)
        else:
            nn.init.kaiming_uniform_(first, a=math.sqrt(5))
        nn.init.zeros_(second)
    elif init == "gaussian":
        nn.init.normal_(first, std=1.0 / rank)
        nn.init.zeros_(second)
    else:  # "random": both factors non-zero, so tests see a real delta
        nn.init.normal_(first, std=1.0 / math.sqrt(first.shape[-1]))
        nn.init.normal_(second, std=1.0 / math.sqrt(rank))


def _refuse_merged_weight(path: str, root: nn.Module) -> None:
    """The residual must come from the original weight; one with a delta merged into it
    would keep that delta's update after its unmerge (the layer reads the residual)."""
    registry = registry_of(root)
    stack = registry.merge_stacks.get(join(path, "weight")) if registry is not None else None
    if stack:
        raise DeltaStateError(
            f"LoRA init='pissa'/'olora' on {path!r}: delta {stack[-1]!r} is merged into its "
            "weight, and the residual must come from the original weight; unmerge it first"
        )


@torch.no_grad()
def _decompose(a, b, residual, weight, init: str, kind: str, scale: float) -> None:
    """PiSSA / OLoRA: ``A``, ``B`` from ``W`` (as out × in, float32); ``residual = W - sBA``.

    The same steps as PEFT's (``torch.linalg.svd`` / ``qr`` in float32, the residual cast
    back to the weight's dtype), so the same weight gives the same factors.
    """
    rank = a.shape[0]
    matrix = _channel_rows(kind, weight.detach()).to(torch.float32)
    if init == "pissa":
        u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = torch.sqrt(singular[:rank] / scale)
        new_a, new_b = root[:, None] * vh[:rank], u[:, :rank] * root
    else:  # olora
        q, r = torch.linalg.qr(matrix)
        new_a, new_b = r[:rank], q[:, :rank]
    a.copy_(new_a)
    b.copy_(new_b)
    rest = matrix - scale * new_b @ new_a
    residual.copy_(to_weight_layout_of(kind, rest))


def to_weight_layout_of(kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """An out × in matrix in a Linear's or GPT-2 Conv1D's own layout."""
    return matrix.t() if kind == CONV1D_GPT2 else matrix


def _warn_dropout(path: str, dropout: float, device) -> None:
    if dropout and device is None:
        warn(
            f"LoRA dropout={dropout} does not apply on {path!r}: the model reads its weight "
            "directly instead of calling it, so the update is folded into the weight "
            "(W + sBA), where dropout on the layer's input has no place; exclude it to keep "
            "dropout everywhere else, or accept it without dropout there"
        )


def lora_weight(kind: str, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + s · BA`` in the weight's own layout: the weight site of a layer the model
    reads without calling it (one fused multiply-add; autograd keeps only ``A``, ``B``)."""
    a, b = tensors
    if kind == LINEAR:
        return lora_parameters.updated_weight(False, scale, weight, tensors)
    if kind in (CONV1D_GPT2, EMBEDDING):  # stored in × out: (BA)ᵀ = AᵀBᵀ
        return torch.addmm(weight, a.t(), b.t(), alpha=scale)
    flat = torch.addmm(weight.flatten(1), b.flatten(1), a.flatten(1), alpha=scale)
    return flat.view_as(weight)


def dora_weight(kind: str, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``m ⊙ (W + sBA) / ‖W + sBA‖`` per output channel (the norm a constant in backward),
    in the weight's layout: DoRA's weight site."""
    a, b, magnitude = tensors
    factor = magnitude.reshape(-1) / weight_norm(kind, scale, weight, a, b)
    full = lora_weight(kind, scale, weight, (a, b))
    if kind in (CONV1D_GPT2, EMBEDDING):  # channels are columns
        return full * factor
    return full * factor.view(-1, *([1] * (full.dim() - 1)))


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


def delta_weight(scale: float, module: nn.Module, tensors) -> torch.Tensor:
    """``s · BA`` in the layout of the module's own weight, in at least float32."""
    exact = torch.promote_types(stored(module, "weight").dtype, torch.float32)
    a, b = tensors["lora_A"].to(exact), tensors["lora_B"].to(exact)
    return to_weight_layout(module, b.flatten(1) @ a.flatten(1)) * scale


def base_weight(module: nn.Module, tensors) -> torch.Tensor:
    """What the update adds to: PiSSA/OLoRA's residual, else the stored weight (not a Full
    copy, not a parametrization)."""
    residual = tensors.get("weight")
    return stored(module, "weight") if residual is None else residual


def merged_weight(scale: float, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    weight = base_weight(module, tensors)
    update = delta_weight(scale, module, tensors)
    return {"weight": (weight.to(update.dtype) + update).to(weight.dtype)}


# ---------------------------------------------------------------------------- DoRA
def weight_norm(kind: str, scale: float, weight, a, b) -> torch.Tensor:
    """``‖W + sBA‖`` per output channel, shape ``(out,)``, outside autograd (DoRA §4.3).

    Formed in the weight's own layout (one ``addmm``, no transposed copy of ``W``).
    """
    weight, a, b = weight.detach(), a.detach(), b.detach()
    if kind == LINEAR:
        return torch.linalg.vector_norm(torch.addmm(weight, b, a, alpha=scale), dim=1)
    if kind == CONV:
        full = torch.addmm(weight.flatten(1), b.flatten(1), a.flatten(1), alpha=scale)
        return torch.linalg.vector_norm(full, dim=1)
    # GPT-2 Conv1D (in × out) and Embedding (num_embeddings × dim): channels are columns
    return torch.linalg.vector_norm(torch.addmm(weight, a.t(), b.t(), alpha=scale), dim=0)


def _add_lora(w: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w + h Bᵀ`` over the last dimension, into ``w`` (a fresh tensor) where it can."""
    h = h.reshape(-1, h.shape[-1])
    if w.is_contiguous():
        w.view(-1, w.shape[-1]).addmm_(h, b.t())
        return w
    return torch.addmm(w.reshape(-1, w.shape[-1]), h, b.t()).view(w.shape)


def dora_bypass(kind: str, scale: float, dropout: float, module, x, y, tensors, writable):
    """``y + (f - 1) ⊙ Wx + f ⊙ sBAx`` with ``f = m / ‖W + sBA‖`` per output channel.

    Written as PEFT writes it, so that ``f = 1`` and ``B = 0`` give back ``y`` bit for
    bit. ``f`` is folded into ``B`` (``out × r``, cheap) rather than applied to the
    ``tokens × out`` LoRA output. With dropout in training, ``Wx`` is recomputed from
    the dropped input, as in PEFT.
    """
    a, b, magnitude = tensors
    weight = module.weight
    factor = magnitude.reshape(-1) / weight_norm(kind, scale, weight, a, b)
    dim = channel_dim(module)
    b = b * (factor * scale).view(-1, *([1] * (b.dim() - 1)))
    bias = None if kind == EMBEDDING else module.bias
    if dropout and module.training:
        x = F.dropout(x, dropout, True)
        if kind == CONV:
            base = module._conv_forward(x, weight, None)
        else:
            base = F.linear(x, weight if kind == LINEAR else weight.t())
    elif bias is None:
        base = y
    else:
        base = y - along_channels(bias, dim, y.dim())
    w = base * along_channels(factor - 1, dim, base.dim())
    if kind == CONV:
        conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
        w.add_(conv(module._conv_forward(x, a, None), b))
    elif kind == EMBEDDING:
        w = _add_lora(w, F.embedding(x, a.t(), module.padding_idx), b)
    else:
        w = _add_lora(w, F.linear(x, a), b)
    # y itself is kept for backward (by the product above) only when it was ``base``
    if writable and base is not y:
        return y.add_(w)
    return y + w


def _channel_rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``out × in`` (a view): one row per output channel."""
    if kind in (CONV1D_GPT2, EMBEDDING):
        return weight.t()
    return weight.flatten(1)


def dora_merged_weight(kind: str, scale: float, module: nn.Module, tensors) -> dict:
    """``m ⊙ (W + sBA) / ‖W + sBA‖`` in the weight's layout; the bias is unchanged."""
    weight = base_weight(module, tensors)
    full = weight.to(torch.promote_types(weight.dtype, torch.float32))
    full = full + delta_weight(scale, module, tensors)
    rows = _channel_rows(kind, full)
    factor = tensors["lora_magnitude_vector"].reshape(-1).to(full.dtype)
    factor = factor / torch.linalg.vector_norm(rows, dim=1)
    merged = rows * factor[:, None]
    return {"weight": to_weight_layout(module, merged).to(weight.dtype)}


# --------------------------------------------------------------------------- LoRA+
def loraplus_param_groups(
    delta,
    lr: float,
    ratio: float = 16.0,
    *,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank
    Adaptation of Large Models"): ``B`` learns ``ratio`` times faster than ``A``.

    The grouping is PEFT's ``create_loraplus_optimizer``: ``A`` and ``B`` of a LoRA on an
    ``nn.Embedding`` get ``lr_embedding``; ``lora_B`` and every 1-D tensor (DoRA's
    magnitudes, an embedding's too; biases) get ``lr · ratio``; the rest (``lora_A``, 2-D tensors of other
    methods, e.g. a ``Full`` head's weight) get ``lr``. Tensors whose name holds
    ``"bias"`` or that belong to a norm layer get no weight decay; the others get
    ``weight_decay``. Empty groups are left out. Pass the result to any
    ``torch.optim`` optimizer.

    Args:
        delta: the :class:`deltahooks.Delta` whose trainable tensors are grouped.
        lr: the learning rate of ``A`` (PEFT: ``lr``), a finite number ``> 0``.
        ratio: ``lr_B / lr_A``, a finite number ``> 0`` (the paper and PEFT suggest
            ``>= 1``; default ``16``, the paper's). PEFT: ``loraplus_lr_ratio``.
        lr_embedding: the learning rate of LoRA tensors on embeddings. Default ``1e-6``.
            PEFT: ``loraplus_lr_embedding``.
        weight_decay: weight decay of the decayed groups. Default ``0.0``. PEFT:
            ``loraplus_weight_decay``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
        >>> groups = dh.loraplus_param_groups(delta, lr=1e-4, ratio=16)
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(1, 0.0001), (1, 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    validate.finite("loraplus_param_groups", "lr", lr, minimum=0)
    validate.finite("loraplus_param_groups", "ratio", ratio, minimum=0)
    validate.finite("loraplus_param_groups", "lr_embedding", lr_embedding, minimum=0)
    validate.finite("loraplus_param_groups", "weight_decay", weight_decay, minimum=0)
    if lr <= 0 or ratio <= 0:
        raise SpecError(
            f"loraplus_param_groups needs lr > 0 and ratio > 0, got lr={lr!r}, ratio={ratio!r}"
        )
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    root = delta.model
    for view in delta.parts:
        embedding = view.method == "lora" and kind_of(root.get_submodule(view.path)) == EMBEDDING
        for key, tensor in view.tensors.items():
            if not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
                continue
            seen.add(id(tensor))
            # a parameter target's tensors sit on the module that owns the parameter
            on_parameter = view.target != view.path and key.startswith(f"{view.target}.")
            owner = root.get_submodule(view.path if on_parameter else key.rpartition(".")[0])
            groups[_loraplus_group(key, tensor, owner, embedding)].append(tensor)
    for key, tensor in delta.shared.items():  # tensors shared by all targets of a spec
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad and id(tensor) not in seen:
            groups[_loraplus_group(key, tensor, root, False)].append(tensor)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def _loraplus_group(key: str, tensor: torch.Tensor, owner: nn.Module, embedding: bool) -> str:
    local = key.rpartition(".")[2]
    # PEFT groups an embedding's DoRA magnitude with the 1-D tensors, not the embedding
    if embedding and local in ("lora_A", "lora_B"):
        return "embedding"
    if local == "lora_B" or tensor.dim() == 1:
        no_decay = "bias" in key or is_norm(owner) or isinstance(owner, nn.LayerNorm)
        return "B_no_decay" if no_decay else "B"
    return "A"
