"""Tiny randomly initialised transformers models built from configs (no download), with inputs."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 97, (2, 7))}


def llama():
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 97, (2, 7))}


def bert():
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=97,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config), {
        "input_ids": torch.randint(0, 97, (2, 7))
    }


def t5():
    config = transformers.T5Config(
        d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4, vocab_size=97
    )
    return transformers.T5ForConditionalGeneration(config), {
        "input_ids": torch.randint(0, 97, (2, 7)),
        "decoder_input_ids": torch.randint(0, 97, (2, 5)),
    }


def vit():
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config), {
        "pixel_values": torch.randn(2, 3, 16, 16)
    }


def opt():
    config = transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=97,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
    )
    return transformers.OPTForCausalLM(config), {"input_ids": torch.randint(0, 97, (2, 7))}


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "t5": t5, "vit": vit, "opt": opt}


def mixtral(experts_implementation: str | None = None):
    """A tiny MoE: each layer's experts are 3-D Parameters (``gate_up_proj``: 4 × 128 × 32,
    ``down_proj``: 4 × 32 × 64), with no Linear module per expert."""
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=97,
        max_position_embeddings=32,
    )
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return transformers.MixtralForCausalLM(config), {"input_ids": torch.randint(0, 97, (2, 7))}


def skip_where_peft_misses_the_cache(model):
    """PEFT 0.21 hands prompts and prefixes over as ``past_key_values``; transformers 5.24
    renamed the forward's argument to ``cache``, and PEFT then refuses BERT and generates
    wrong tokens (its cache is missed, as ours was). Parity with PEFT is checked where PEFT
    works; cached steps are checked against plain forwards everywhere in
    tests/test_generation_cache.py.
    """
    forwards = (model.forward, model.base_model.forward)
    if all("past_key_values" not in inspect.signature(f).parameters for f in forwards):
        pytest.skip("PEFT passes past_key_values, which this transformers calls cache")
