"""Write a delta as a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained`` loads with the
same outputs: what serving stacks and the Hub consume.

A PEFT directory holds one adapter type plus ``modules_to_save`` copies, so a delta
exports when it holds one method with an exporter (registered with
:func:`peft_exporter`), with any :class:`~deltahooks.Full` parts as ``modules_to_save``.
Targets are written as the exact module paths the delta adapted, so PEFT adapts the
same modules whatever target syntax the spec used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from ..distributed import gathered, writes
from ..errors import DeltaFileError, DeltaStateError, UnsupportedOperationError, warn
from ..formats import register_writer
from .peft import PEFT_ATTENTION_BUG, PREFIX, PROMPT_LEARNING, PROMPT_PREFIX

Exporter = Callable[[nn.Module, list, list], tuple[dict, dict[str, torch.Tensor]]]
EXPORTERS: dict[str, Exporter] = {}
"""method → ``exporter(model, specs, parts) -> (config fields, tensors by bare PEFT key)``.

``specs`` are the delta's specs of that method (by ``spec_index`` order), ``parts`` their
:class:`~deltahooks.delta.PartView` s; keys are without PEFT's ``base_model.model.``.
An exporter raises :class:`UnsupportedOperationError` for what PEFT cannot express.
"""


def peft_exporter(method: str) -> Callable[[Exporter], Exporter]:
    """Register the PEFT exporter of one deltahooks method (``"lora"``, ``"ia3"``, ...)."""

    def register(exporter: Exporter) -> Exporter:
        EXPORTERS[method] = exporter
        return exporter

    return register


@register_writer("peft")
def save_peft(delta, directory: str | os.PathLike, *, task_type: str | None = None) -> None:
    """Write ``delta`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``task_type`` is PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); ``None`` writes none,
    which PEFT loads as a plain ``PeftModel``. A delta PEFT cannot express (two methods,
    a method without an exporter, settings PEFT lacks) raises
    :class:`deltahooks.UnsupportedOperationError` naming the part, and writes nothing.

    Example::

        delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"]))
        dh.save_peft(delta, "my-adapter/")   # or delta.save_peft("my-adapter/")
        peft.PeftModel.from_pretrained(base_model, "my-adapter/")
    """
    if not delta.attached:
        raise DeltaStateError(f"delta {delta.name!r} is detached; attach it again to save it")
    model = delta.model
    by_method: dict[str, list] = {}
    for part in delta.parts:
        by_method.setdefault(part.method, []).append(part)
    heads = by_method.pop("full", [])
    if len(by_method) != 1:
        kinds = sorted(by_method) or ["only Full parts"]
        raise UnsupportedOperationError(
            f"a PEFT adapter directory holds one adapter type (plus modules_to_save), but delta "
            f"{delta.name!r} holds {kinds}; attach and save each method as its own delta"
        )
    ((method, parts),) = by_method.items()
    exporter = EXPORTERS.get(method)
    if exporter is None:
        raise UnsupportedOperationError(
            f"{method} has no PEFT equivalent that deltahooks can write (exportable: "
            f"{sorted(EXPORTERS)}); keep it as a deltahooks file with delta.save(...)"
        )
    indices = sorted({part.spec_index for part in parts})
    fields, tensors = exporter(model, [delta.specs[i] for i in indices], parts)
    with torch.no_grad():
        for part in heads:
            tensors.update({key: t.detach() for key, t in part.tensors.items()})
    task = fields.pop("task_type", None)  # prompt learning: PEFT needs one; the user's wins
    config = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "inference_mode": True,
        "modules_to_save": [part.path for part in heads] + fields.pop("modules_to_save", [])
        or None,
        "revision": None,
        "task_type": task_type or task,
        **fields,
    }
    if config["modules_to_save"]:
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    prefix = PREFIX
    if config["peft_type"] in PROMPT_LEARNING:  # PEFT's keys there: no wrapper in between
        prefix = PROMPT_PREFIX
    named = {(key if key == "prompt_embeddings" else prefix + key): t for key, t in tensors.items()}
    # shared tensors (stored once, on the root; VeRA's projections) are PEFT's model-level
    # state: base_model.<name>, beside the wrapped model rather than in it
    named.update({PROMPT_PREFIX + key: t.detach() for key, t in delta.shared.items()})
    named, sharded = gathered(named)  # FSDP2 shards: a collective, on every rank
    if writes(sharded):
        write(os.fspath(directory), config, named)


def write(directory: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Both files appear whole (temporary name, then rename); the directory may exist."""
    from safetensors.torch import save_file

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DeltaFileError(f"{directory!r} is a file; PEFT adapters are directories")
    os.makedirs(directory, exist_ok=True)
    cpu = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
    for name, dump in (
        ("adapter_model.safetensors", lambda path: save_file(cpu, path, {"format": "pt"})),
        ("adapter_config.json", lambda path: _dump_json(config, path)),
    ):
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(handle)
        try:
            dump(temporary)
            os.chmod(temporary, 0o644)
            os.replace(temporary, os.path.join(directory, name))
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _dump_json(config: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def most_common(values: dict[str, float]):
    return Counter(values.values()).most_common(1)[0][0]


def exact(path: str) -> str:
    """A PEFT pattern key (regex matched on a ``.`` boundary) for exactly this path."""
    return re.escape(path)


def one_setting(method: str, specs: list, name: str):
    """The value all specs share for ``name``, or why PEFT cannot hold them together."""
    values = {repr(getattr(spec, name)) for spec in specs}
    if len(values) > 1:
        raise UnsupportedOperationError(
            f"the {method} specs of this delta differ in {name} ({sorted(values)}); PEFT holds "
            f"one {name} per adapter: save them as separate deltas"
        )
    return getattr(specs[0], name)


# ------------------------------------------------------------------------------ LoRA
def _attention_to_peft(part) -> dict[str, torch.Tensor]:
    """LoRA on an ``nn.MultiheadAttention``, as PEFT lays it out: the input projection's
    pair on the module, ``out_proj``'s under ``base_layer.out_proj`` (PEFT wraps it there)."""
    path = part.path
    if f"{path}.lora_A" not in part.tensors:  # separate q/k/v projections
        raise UnsupportedOperationError(
            f"LoRA on {path!r}, an nn.MultiheadAttention with separate query/key/value "
            "projections (kdim or vdim set), has no PEFT form (PEFT takes only a packed "
            "in_proj_weight); keep it as a deltahooks file with delta.save(...)"
        )
    warn(PEFT_ATTENTION_BUG)
    base = f"{path}.base_layer.out_proj" if path else "base_layer.out_proj"
    return {
        f"{path}.lora_A.weight": part.tensors[f"{path}.lora_A"].detach(),
        f"{path}.lora_B.weight": part.tensors[f"{path}.lora_B"].detach(),
        f"{base}.lora_A.weight": part.tensors[f"{path}.out_proj.lora_A"].detach(),
        f"{base}.lora_B.weight": part.tensors[f"{path}.out_proj.lora_B"].detach(),
    }


@peft_exporter("lora")
def lora_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """LoRA: same layouts; per-path ranks and alphas become exact-path patterns."""
    from ..layers import CONV1D_GPT2, EMBEDDING, kind_of
    from ..targets import first_match, parameter_paths
    from .peft_lora_parameters import nesting, to_peft

    dropout = one_setting("LoRA", specs, "dropout")
    rslora = one_setting("LoRA", specs, "rslora")
    dora = one_setting("LoRA", specs, "dora")
    residual = sorted({spec.init for spec in specs} & {"pissa", "olora"})
    if residual:
        raise UnsupportedOperationError(
            f"a LoRA with init={residual[0]!r} acts on a residual of the base weight, which a "
            "PEFT adapter of the original base cannot express; keep it as a deltahooks file "
            "with delta.save(...), or merge it"
        )
    by_index = {part.spec_index: part for part in parts}
    spec_of = dict(zip(sorted(by_index), specs))
    ranks, alphas, tensors, fan_in_fan_out = {}, {}, {}, False
    # parameter targets: PEFT nests one wrapper per parameter of a module (see
    # peft_lora_parameters); ordered as the module holds them, as PEFT wraps them
    order = {path: i for i, (path, _) in enumerate(parameter_paths(model))}
    targeted = sorted((p.target for p in parts if p.target != p.path), key=order.__getitem__)
    on_root = [path for path in targeted if not path.module_path]
    if on_root:
        raise UnsupportedOperationError(
            f"LoRA on {on_root[0]!r}, a parameter of the model's root module, has no PEFT form "
            "(PEFT cannot target parameters of the module it wraps); keep it as a deltahooks "
            "file with delta.save(...), or attach the delta to a model that holds this one"
        )
    prefix_of = {path: prefix for prefix, path in nesting(targeted).items()}
    for part in parts:
        spec = spec_of[part.spec_index]
        module = model.get_submodule(part.path)
        attention = None
        if isinstance(module, nn.MultiheadAttention):
            attention = _attention_to_peft(part)  # refuses what PEFT cannot hold first
        a, b = (part.tensors[f"{part.target}.lora_{x}"] for x in "AB")
        ranks[part.target] = int(a.shape[-2] if part.target in prefix_of else a.shape[0])
        alpha = first_match(part.target, module, spec.alpha_pattern, model)
        alphas[part.target] = float(spec.alpha if alpha is None else alpha)
        if part.target in prefix_of:
            a, b = to_peft(a.detach(), b.detach())
            tensors[f"{prefix_of[part.target]}.lora_A.weight"] = a
            tensors[f"{prefix_of[part.target]}.lora_B.weight"] = b
            continue
        if attention is not None:
            tensors.update(attention)
            continue
        kind = kind_of(module)
        fan_in_fan_out |= kind == CONV1D_GPT2
        if kind == EMBEDDING:
            names = ("lora_embedding_A", "lora_embedding_B")
        else:
            names = ("lora_A.weight", "lora_B.weight")
        tensors[f"{part.path}.{names[0]}"] = a.detach()
        tensors[f"{part.path}.{names[1]}"] = b.detach()
        if dora:  # same name and layout as PEFT's
            magnitude = f"{part.path}.lora_magnitude_vector"
            tensors[magnitude] = part.tensors[magnitude].detach()
    r, alpha = most_common(ranks), most_common(alphas)
    fields = {
        "peft_type": "LORA",
        "target_modules": sorted(p for p in ranks if p not in prefix_of),
        "target_parameters": targeted or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": dora,
        "rank_pattern": {exact(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {exact(p): v for p, v in alphas.items() if v != alpha},
    }
    return fields, tensors
