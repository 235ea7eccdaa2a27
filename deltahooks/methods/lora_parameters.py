"""LoRA on a parameter rather than a module: ``W ← W + s · BA`` through a weight site.

For targets that name a parameter (``"experts.gate_up_proj"``, ``"q_proj.weight"``): a
2-D weight read as ``out × in`` (``A``: r × in, ``B``: out × r), or a 3-D stack of
experts, ``E × out × in`` (``A``: E × r × in, ``B``: E × out × r, one rank-``r`` pair
per expert). transformers stores every MoE model's experts as such stacks (no Linear
module exists per expert); an experts module with ``is_transposed = True`` (its
convention, e.g. GPT-OSS) stores them ``E × in × out`` instead. The owning module's own
forward reads the updated tensor, whatever it does with it.

The update is folded into the weight, so dropout on the layer's input ``x`` has no place
to go (``B A dropout(x)`` cannot be factored out of ``x``): parameter targets refuse
``dropout > 0``, as PEFT's ``target_parameters`` do.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..errors import SpecError, UnsupportedModuleError, warn
from ..merging import stored
from ..sites import WeightSite
from ..spec import DeviceLike, Part
from ..targets import ParameterPath

FACTORS = ("lora_A", "lora_B")


def parameter_of(path: ParameterPath, module: nn.Module) -> torch.Tensor:
    """The parameter ``path`` names on its owning ``module`` (under any parametrization)."""
    return stored(module, path.name)


def shape_of(path: ParameterPath, module: nn.Module) -> tuple[int, int, int, bool]:
    """``(experts, out, in, transposed)`` of the targeted weight; ``experts`` is 0 for 2-D."""
    weight = parameter_of(path, module)
    if weight.dim() == 2:
        return 0, weight.shape[0], weight.shape[1], False
    transposed = bool(getattr(module, "is_transposed", False))
    experts, first, second = weight.shape
    return (experts, second, first, True) if transposed else (experts, first, second, False)


def check(spec, path: ParameterPath, module: nn.Module) -> None:
    """Refuse what a parameter target cannot take, before anything is built."""
    weight = parameter_of(path, module)
    if weight.dim() not in (2, 3) or not weight.is_floating_point():
        raise UnsupportedModuleError(
            f"LoRA cannot adapt parameter {path!r} ({weight.dim()}-D {weight.dtype}, shape "
            f"{list(weight.shape)}): a parameter target must be a floating 2-D weight "
            "(out × in) or a 3-D stack of experts (experts × out × in); target a weight "
            "matrix, or the module that uses this tensor"
        )
    refused = [
        (
            spec.dropout > 0,
            f"dropout={spec.dropout}",
            "its update is folded into the weight (W + sBA), and B·A·dropout(x) cannot be "
            "factored out of the input x",
            "dropout=0.0",
        ),
        (spec.dora, "dora=True", "DoRA rescales a layer's output channels", "dora=False"),
        (
            spec.init in ("pissa", "olora"),
            f"init={spec.init!r}",
            "that init decomposes the weight of a Linear or Conv1D layer",
            "init='default'",
        ),
    ]
    for bad, setting, why, fix in refused:
        if bad:
            raise SpecError(
                f"LoRA {setting} cannot apply to parameter target {path!r}: {why}. Use {fix} "
                f"for parameter targets (a separate dh.LoRA spec may keep {setting} for module "
                "targets)"
            )


def make_part(
    spec, path: ParameterPath, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
) -> Part:
    """Per-expert ``A``, ``B`` on the owning module, named ``<parameter>.lora_A`` / ``_B``."""
    rank, scale = spec.rank_and_scale(path, module, root)
    experts, fan_out, fan_in, transposed = shape_of(path, module)
    weight = parameter_of(path, module)
    like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
    stack = (experts,) if experts else ()
    a = torch.empty(*stack, rank, fan_in, **like)
    b = torch.empty(*stack, fan_out, rank, **like)
    if spec.real_build(device):
        if rank > min(fan_in, fan_out):
            warn(
                f"LoRA rank {rank} on {path!r} exceeds the full rank {min(fan_in, fan_out)} "
                f"of its {fan_out} x {fan_in} weight{'s' if experts else ''}: the extra "
                "directions add parameters but no expressiveness; lower r (or rank_pattern)"
            )
        initialise(a, b, spec.init, rank)
    names = tuple(f"{path.name}.{factor}" for factor in FACTORS)
    fn = partial(updated_weight, transposed, scale)
    # A weight site: the experts module reads its stacks however it likes (a loop over
    # experts, batched or grouped matmuls), so the update must be in the tensor itself;
    # once per call, as transformers' eager experts loop reads the stack once per expert.
    return Part(
        path.module_path,
        dict(zip(names, (a, b))),
        [WeightSite(fn, path.name, names, once_per_call=True)],
        merge=partial(merged_weight, fn, path.name, names),
        target=path,
    )


@torch.no_grad()
def initialise(a: torch.Tensor, b: torch.Tensor, init: str, rank: int) -> None:
    """PEFT's inits; ``A`` of a stack is drawn as PEFT's ``(E·r) × in`` matrix, so the same
    seed gives the same factors."""
    rows = a.view(-1, a.shape[-1])
    if init == "default":
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif init == "gaussian":
        nn.init.normal_(rows, std=1.0 / rank)
        nn.init.zeros_(b)
    else:  # "random": both non-zero, so tests see a real delta
        nn.init.normal_(a, std=1.0 / math.sqrt(a.shape[-1]))
        nn.init.normal_(b, std=1.0 / math.sqrt(rank))


def updated_weight(transposed: bool, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + s · BA`` (per expert for a stack), one fused multiply-add in ``W``'s layout.

    Autograd keeps only ``A`` and ``B`` for the backward, never a weight-sized tensor.
    """
    a, b = tensors
    if weight.dim() == 2:
        return torch.addmm(weight, b, a, alpha=scale)
    if transposed:  # E × in × out: (BA)ᵀ = AᵀBᵀ
        return torch.baddbmm(weight, a.mT, b.mT, alpha=scale)
    return torch.baddbmm(weight, b, a, alpha=scale)


def merged_weight(fn, attr: str, names: tuple[str, str], module: nn.Module, tensors) -> dict:
    """The site's own function on the stored weight, computed in at least float32."""
    weight = stored(module, attr)
    exact = torch.promote_types(weight.dtype, torch.float32)
    factors = tuple(tensors[name].to(exact) for name in names)
    return {attr: fn(weight.to(exact), factors).to(weight.dtype)}
