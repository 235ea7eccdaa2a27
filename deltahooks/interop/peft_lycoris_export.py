"""Write LoHa and LoKr deltas as PEFT adapters: their tensors already carry PEFT's names
and layouts, so the config is all there is to build (ranks and alphas per exact path)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedOperationError
from ..layers import CONV1D_GPT2, kind_of
from ..targets import first_match
from .peft_export import exact, most_common, one_setting, peft_exporter


def _common(method: str, model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    spec_of = dict(zip(sorted({part.spec_index for part in parts}), specs))
    ranks, alphas, tensors = {}, {}, {}
    for part in parts:
        spec, module = spec_of[part.spec_index], model.get_submodule(part.path)
        if kind_of(module) == CONV1D_GPT2:
            raise UnsupportedOperationError(
                f"PEFT's {method} does not take GPT-2 Conv1D layers such as {part.path!r}; "
                "keep this delta as a deltahooks file with delta.save(...)"
            )
        rank = first_match(part.path, module, spec.rank_pattern, model)
        alpha = first_match(part.path, module, spec.alpha_pattern, model)
        ranks[part.path] = int(spec.r if rank is None else rank)
        alphas[part.path] = float(spec.alpha if alpha is None else alpha)
        for key, tensor in part.tensors.items():
            tensors[key] = tensor.detach()
    r, alpha = most_common(ranks), most_common(alphas)
    fields = {
        "target_modules": sorted(ranks),
        "r": r,
        "alpha": alpha,
        "rank_pattern": {exact(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {exact(p): v for p, v in alphas.items() if v != alpha},
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "init_weights": True,
    }
    return fields, tensors


@peft_exporter("loha")
def loha_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    fields, tensors = _common("LoHa", model, specs, parts)
    return {"peft_type": "LOHA", **fields}, tensors


@peft_exporter("lokr")
def lokr_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    factor = one_setting("LoKr", specs, "factor")
    decompose_both = one_setting("LoKr", specs, "decompose_both")
    fields, tensors = _common("LoKr", model, specs, parts)
    extra = {
        "decompose_factor": factor,
        "decompose_both": decompose_both,
        "rank_dropout_scale": False,
    }
    return {"peft_type": "LOKR", **fields, **extra}, tensors
