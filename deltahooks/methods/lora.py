"""LoRA (Hu et al., 2021): ``y = f(x) + s · B(A(dropout(x)))``, with ``s = α/r`` (or ``α/√r``).

Training runs as a forward-hook bypass on the unchanged module; :meth:`Delta.merge`
folds ``s · BA`` into the weight so a merged forward costs what the base costs.
Tensor layouts follow PEFT (``A``: r × fan-in, ``B``: fan-out × r; for embeddings
``A``: r × num_embeddings, ``B``: embedding_dim × r) so files convert without transposes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from ..errors import DeltaStateError, SpecError, UnsupportedModuleError, warn
from ..ledger import Ledger
from ..merging import swap_in
from ..spec import (
    DeltaSpec,
    DeviceLike,
    Part,
    Switch,
    check_flag,
    check_probability,
    explain_failure,
    is_count,
    is_number,
    register_method,
)
from ..targets import first_match, is_conv1d_gpt2

INITS = ("default", "gaussian", "random")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d_gpt2(module):
        return "conv1d_gpt2"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def raise_if_training_merged(switch: Switch, module: nn.Module) -> None:
    """Hooks call this when inactive: a merged delta cannot learn (its tensors are unused)."""
    if switch.merged and module.training and torch.is_grad_enabled():
        raise DeltaStateError(
            f"delta {switch.name!r} is merged, so training would not update it; "
            "call delta.unmerge() before training, or model.eval() / torch.no_grad() for inference"
        )


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

    Args:
        targets: which modules get an update, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"q_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required. PEFT: ``target_modules``. Each target must be an
            ``nn.Linear``, transformers' GPT-2 ``Conv1D``, ``nn.Embedding`` or
            ``nn.Conv1d/2d/3d`` with ``groups=1``; any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach.
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
            Default ``"default"``.
        rank_pattern: per-target rank overrides, ``{pattern: rank}``, e.g.
            ``{"down_proj": 4}``. Keys use the target syntax (suffix, glob, ``"re:"``,
            ...); for each target the first key that matches it wins, and targets no
            key matches use ``r``. Values are positive integers. Default ``{}``. PEFT:
            ``rank_pattern``.
        alpha_pattern: per-target ``alpha`` overrides, ``{pattern: alpha}``, matched
            like ``rank_pattern``; values are finite numbers ``>= 0``. Default ``{}``.
            PEFT: ``alpha_pattern``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> spec = dh.LoRA(targets=torch.nn.Linear, r=2, alpha=4, rank_pattern={"1": 1})
        >>> delta = dh.attach(model, spec)
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.lora_A': (2, 4), '0.lora_B': (4, 2), '1.lora_A': (1, 4), '1.lora_B': (4, 1)}
    """

    method = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["default", "gaussian", "random"] = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            if not isinstance(pattern, dict):
                raise SpecError(
                    f"LoRA {name} must be a dict such as {{'down_proj': 4}}, got {pattern!r}"
                )
        for where, rank in [("r", self.r), *self.rank_pattern.items()]:
            if not is_count(rank):
                raise SpecError(f"LoRA rank {where}={rank!r} must be a positive integer, e.g. r=8")
        for where, alpha in [("alpha", self.alpha), *self.alpha_pattern.items()]:
            if not is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
                raise SpecError(f"LoRA alpha {where}={alpha!r} must be a finite number >= 0")
        check_probability("LoRA dropout", self.dropout)
        check_flag("LoRA rslora", self.rslora)
        if self.init not in INITS:
            raise SpecError(f"LoRA init={self.init!r} is unknown; choose one of {list(INITS)}")
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            if not all(isinstance(k, str) for k in pattern):
                raise SpecError(f"LoRA {name} keys must be target strings such as 'down_proj'")

    def check_module(self, path: str, module: nn.Module) -> None:
        kind = _kind(module)
        if kind is None:
            raise UnsupportedModuleError(
                f"LoRA cannot adapt {path!r} ({type(module).__name__}); it supports nn.Linear, "
                "transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Narrow targets "
                "(e.g. add exclude=...) or target the linear layers inside it"
            )
        if kind == "conv" and module.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA on grouped convolution {path!r} (groups={module.groups}) is not "
                "supported; exclude it from targets"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> LoRAPart:
        rank = first_match(path, module, self.rank_pattern, root) or self.r
        alpha = first_match(path, module, self.alpha_pattern, root)
        alpha = self.alpha if alpha is None else alpha
        scale = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        kind = _kind(module)
        weight = module.weight
        like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        if kind == "embedding":
            fan_in, fan_out = weight.shape
            a = torch.empty(rank, fan_in, **like)
            b = torch.empty(fan_out, rank, **like)
        elif kind == "conv":
            fan_out, fan_in = weight.shape[0], weight[0].numel()
            a = torch.empty(rank, weight.shape[1], *weight.shape[2:], **like)
            b = torch.empty(weight.shape[0], rank, *([1] * (weight.dim() - 2)), **like)
        else:
            fan_out, fan_in = weight.shape if kind == "linear" else weight.shape[::-1]
            a = torch.empty(rank, fan_in, **like)
            b = torch.empty(fan_out, rank, **like)
        full_rank = min(fan_in, fan_out)
        if device is None:  # a real build; a plan (device="meta") needs shapes only
            if rank > full_rank:
                warn(
                    f"LoRA rank {rank} on {path!r} exceeds the full rank {full_rank} of its "
                    f"{fan_out} x {fan_in} weight: the extra {rank - full_rank} directions add "
                    f"parameters but no expressiveness; use r <= {full_rank} (or rank_pattern) "
                    "for this layer"
                )
            _initialise(a, b, self.init, kind, rank)
        tensors = {(path, "lora_A"): (a, True), (path, "lora_B"): (b, True)}
        dropout = 0.0 if kind == "embedding" else self.dropout
        return LoRAPart(path, tensors, kind, scale, dropout)


@torch.no_grad()
def _initialise(a: torch.Tensor, b: torch.Tensor, init: str, kind: str, rank: int) -> None:
    # The zero factor makes the delta start at exactly zero; for embeddings it is A
    # (PEFT's convention), since A is what the token ids index.
    first, second = (b, a) if kind == "embedding" else (a, b)
    if init == "default":
        if kind == "embedding":
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


class _Bypass:
    """The forward hook: adds ``s · B(A(x))`` to the module's output.

    When this hook is the module's first forward hook, nobody else has seen the output
    yet, so the update is accumulated into it in place (one GEMM, no copy; the layers
    LoRA adapts never save their output for backward). Otherwise it returns a new tensor.
    """

    __slots__ = ("a", "b", "dropout", "hook_id", "kind", "scale", "switch")

    def __init__(self, switch: Switch, a: str, b: str, scale: float, dropout: float, kind: str):
        self.switch = switch
        self.a = a
        self.b = b
        self.scale = scale
        self.dropout = dropout
        self.kind = kind
        self.hook_id = -1

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        if not self.switch.active:
            raise_if_training_merged(self.switch, module)
            return None
        params = module._parameters
        a = params[self.a]
        b = params[self.b]
        x = args[0] if args else next(iter(kwargs.values()))
        if a.is_meta and not output.is_meta:  # torch would compute garbage, not raise
            raise explain_failure(self.switch.name, module, x, (a, b), None)
        try:
            return self._add(module, x, a, b, output)
        except (RuntimeError, NotImplementedError) as err:
            raise explain_failure(self.switch.name, module, x, (a, b), err) from err

    def _add(self, module: nn.Module, x, a, b, output):
        kind = self.kind
        if kind == "embedding":
            h = F.embedding(x, a.t(), module.padding_idx)
            return output + F.linear(h, b) * self.scale
        if self.dropout and module.training:
            x = F.dropout(x, self.dropout, True)
        if kind == "conv":
            h = module._conv_forward(x, a, None)
            conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
            return output + conv(h, b) * self.scale
        h = F.linear(x, a)
        h = h.reshape(-1, h.shape[-1])
        if (
            next(iter(module._forward_hooks)) == self.hook_id
            and not _global_forward_hooks
            and output.is_contiguous()
        ):
            output.view(-1, output.shape[-1]).addmm_(h, b.t(), alpha=self.scale)
            return output
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), h, b.t(), alpha=self.scale)
        return flat.view(output.shape)


class LoRAPart(Part):
    def __init__(self, path, tensors, kind: str, scale: float, dropout: float) -> None:
        super().__init__(path, tensors)
        self.kind = kind
        self.scale = scale
        self.dropout = dropout

    def install_hooks(self, ledger: Ledger, switch: Switch) -> None:
        a, b = (entry.reserved for entry in self.entries)
        hook = _Bypass(switch, a, b, self.scale, self.dropout, self.kind)
        # prepend: a LoRA update is part of the layer itself, so it runs before any other
        # forward hook (an Adapter on the same output sees base + update, merged or not)
        entry = ledger.forward_hook(self.path, hook, with_kwargs=True, prepend=True)
        hook.hook_id = entry.handle.id
        self.hooks.append(entry)

    @torch.no_grad()
    def delta_weight(self, ledger: Ledger) -> torch.Tensor:
        """``s · BA`` in the layout of the module's own weight, in at least float32."""
        weight = ledger.module(self.path).weight
        exact = torch.promote_types(weight.dtype, torch.float32)
        a, b = (ledger.tensor(entry).to(exact) for entry in self.entries)
        if self.kind == "conv":
            update = (b.flatten(1) @ a.flatten(1)).view(weight.shape)
        else:
            update = b @ a
            if self.kind in ("conv1d_gpt2", "embedding"):
                update = update.t()
        return update * self.scale

    @torch.no_grad()
    def merge(self, ledger: Ledger) -> None:
        weight = ledger.module(self.path)._parameters["weight"]  # not a Full shadow
        update = self.delta_weight(ledger)
        merged = (weight.to(update.dtype) + update).to(weight.dtype)
        self.merges.append(swap_in(ledger, self.path, "weight", merged))
