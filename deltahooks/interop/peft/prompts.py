"""PEFT's prompt tuning and prefix tuning adapters, both ways, for decoder-only and
encoder-only models.

PEFT stores both under the unprefixed key ``prompt_embeddings``: the soft prompt
(``num_tokens × embedding width``), or the final prefixes (``num_tokens × layers · 2 ·
key/value width``, computed through the projection MLP when there is one), which are our
``prompt_embeddings`` and our ``PrefixTuning(reparameterize=False)`` ``prefixes`` as they
are. Encoder-decoder models are refused: PEFT lays their prompts and prefixes out for two
transformer stacks (and shares one prefix between a decoder layer's self- and
cross-attention), which ours does not.
"""

from __future__ import annotations

from torch import nn

from ...errors import DeltaFileError, UnsupportedOperationError
from ...methods import PrefixTuning, PromptTuning
from ...methods._calls import is_encoder_decoder
from ...methods._prefix_geometry import geometry
from .registry import peft_exporter, peft_importer

KEY = "prompt_embeddings"
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"))
TASKS += (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"))
TASKS += (("ForQuestionAnswering", "QUESTION_ANS"),)


def refuse_encoder_decoder(model: nn.Module, method: str) -> None:
    if is_encoder_decoder(model):
        raise UnsupportedOperationError(
            f"PEFT's {method} on an encoder-decoder model lays its tensors out for two "
            "transformer stacks, which deltahooks' does not; keep such a delta as a deltahooks "
            "file (delta.save / dh.load)"
        )


def task_type(model: nn.Module) -> str:
    """PEFT's task type from the transformers class name, which PEFT needs for prompts."""
    name = type(model).__name__
    for ending, task in TASKS:
        if name.endswith(ending):
            return task
    raise UnsupportedOperationError(
        f"PEFT needs a task type for prompt and prefix tuning, and {name} does not say which; "
        "pass task_type=... (e.g. 'CAUSAL_LM', 'SEQ_CLS')"
    )


def only_prompt(tensors: dict, method: str):
    other = sorted(k for k in tensors if k != KEY)
    if other or KEY not in tensors:
        raise DeltaFileError(
            f"a PEFT {method} adapter holds exactly {KEY!r}; this one holds {sorted(tensors)[:5]}"
        )
    return tensors[KEY]


@peft_importer("PROMPT_TUNING")
def prompt_tuning_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    refuse_encoder_decoder(model, "prompt tuning")
    prompt = only_prompt(tensors, "prompt tuning")
    return [PromptTuning(num_tokens=int(prompt.shape[0]))], {KEY: prompt}


@peft_importer("PREFIX_TUNING")
def prefix_tuning_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    refuse_encoder_decoder(model, "prefix tuning")
    prefixes = only_prompt(tensors, "prefix tuning")
    spec = PrefixTuning(num_tokens=int(prefixes.shape[0]), reparameterize=False)
    return [spec], {"prefixes": prefixes}


CLASSIFIERS = ("classifier", "score")  # the heads PEFT's SEQ_CLS models always save


def with_heads(model: nn.Module, fields: dict, tensors: dict) -> tuple[dict, dict]:
    """PEFT's sequence classifiers load their head from the file (``modules_to_save``):
    a delta that leaves the head alone exports the head as it is."""
    if fields["task_type"] != "SEQ_CLS":
        return fields, tensors
    heads = [p for p, _ in model.named_modules() if p.rpartition(".")[2] in CLASSIFIERS]
    for path in heads:
        module = model.get_submodule(path)
        for name, value in module.named_parameters():
            tensors[f"{path}.{name}"] = value.detach()
    return {**fields, "modules_to_save": heads}, tensors


@peft_exporter("prompt_tuning")
def prompt_tuning_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    refuse_encoder_decoder(model, "prompt tuning")
    (part,) = parts
    prompt = part.tensors[KEY].detach()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    fields = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type(model),
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    return with_heads(model, fields, {KEY: prompt})


@peft_exporter("prefix_tuning")
def prefix_tuning_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    refuse_encoder_decoder(model, "prefix tuning")
    (part,) = parts
    (spec,) = specs
    stored = spec.saved({key.rpartition(".")[2]: t for key, t in part.tensors.items()})[1]
    prefixes = stored["prefixes"].detach()
    (layers, heads, head_dim, value_dim), _ = geometry(part.path, model.get_submodule(part.path))
    if value_dim != head_dim:
        raise UnsupportedOperationError(
            f"PEFT's prefix tuning holds keys and values of one size, but this model caches keys "
            f"of {head_dim} and values of {value_dim} per head (multi-head latent attention); "
            "save the delta with delta.save() instead"
        )
    fields = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type(model),
        "num_virtual_tokens": int(prefixes.shape[0]),
        "token_dim": heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
    }
    return with_heads(model, fields, {KEY: prefixes})
