"""Tiny transformers architectures for the architecture matrix, built from configs (no download).

Each entry of :data:`ARCHITECTURES` says how to build one model (a config and a class: random
weights, 2 layers, hidden 32, vocabulary 64), the inputs it takes, and how it generates. The
config is made once per architecture (:func:`config_of` caches it); :func:`build` makes a new
model from it under a fixed seed each time, so two builds are the same model and no test sees
another test's mutations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

VOCAB = 64
HIDDEN = 32
BATCH = 2
SEQ = 7

DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class Architecture:
    """How to build and feed one tiny architecture."""

    name: str
    model_class: str  # a class name in transformers
    config: Callable[[], transformers.PretrainedConfig]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    generates: str | None = None  # "decoder" (causal LM), "seq2seq", or None
    kind: str = "decoder"  # decoder, moe, ssm, seq2seq, encoder, vision, audio, multimodal


def token_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def seq2seq_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = token_inputs(generator)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 4), generator=generator)
    return inputs


def image_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator)}


def audio_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(BATCH, 400, generator=generator)}


def whisper_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_features": torch.randn(BATCH, 8, 16, generator=generator),
        "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, 4), generator=generator),
    }


LLAVA_IMAGE_TOKEN = VOCAB - 1
LLAVA_IMAGE_TOKENS = 4  # a 16 × 16 image in 8 × 8 patches, the CLS token dropped


def llava_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    text = torch.randint(3, VOCAB - 1, (BATCH, SEQ - LLAVA_IMAGE_TOKENS), generator=generator)
    image = torch.full((BATCH, LLAVA_IMAGE_TOKENS), LLAVA_IMAGE_TOKEN)
    ids = torch.cat([image, text], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator),
    }


def clip_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = token_inputs(generator)
    inputs.update(image_inputs(generator))
    return inputs


def decoder(cls_config, **overrides):
    return lambda: cls_config(**{**DECODER, **overrides})


def encoder_config(cls_config, **overrides):
    options = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return lambda: cls_config(**{**options, **overrides})


def clip_vision():
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=HIDDEN,
    )


T = transformers
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        # decoder language models
        Architecture("llama", "LlamaForCausalLM", decoder(T.LlamaConfig), token_inputs, "decoder"),
        Architecture(
            "gpt2",
            "GPT2LMHeadModel",
            lambda: T.GPT2Config(
                n_layer=2,
                n_embd=HIDDEN,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
            token_inputs,
            "decoder",
        ),
        Architecture(
            "opt",
            "OPTForCausalLM",
            lambda: T.OPTConfig(
                hidden_size=HIDDEN,
                ffn_dim=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=HIDDEN,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            token_inputs,
            "decoder",
        ),
        Architecture(
            "qwen3", "Qwen3ForCausalLM", decoder(T.Qwen3Config, head_dim=8), token_inputs, "decoder"
        ),
        Architecture(
            "gemma2",
            "Gemma2ForCausalLM",
            decoder(T.Gemma2Config, head_dim=8),
            token_inputs,
            "decoder",
        ),
        Architecture(
            "gemma3",
            "Gemma3ForCausalLM",
            decoder(T.Gemma3TextConfig, head_dim=8, sliding_window=4),
            token_inputs,
            "decoder",
        ),
        Architecture(
            "falcon",
            "FalconForCausalLM",
            lambda: T.FalconConfig(
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                multi_query=True,
                new_decoder_architecture=False,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            token_inputs,
            "decoder",
        ),
        Architecture("phi3", "Phi3ForCausalLM", decoder(T.Phi3Config), token_inputs, "decoder"),
        Architecture(
            "mistral", "MistralForCausalLM", decoder(T.MistralConfig), token_inputs, "decoder"
        ),
        # mixture of experts
        Architecture(
            "mixtral",
            "MixtralForCausalLM",
            decoder(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2),
            token_inputs,
            "decoder",
            "moe",
        ),
        Architecture(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            decoder(
                T.Qwen3MoeConfig,
                head_dim=8,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
            ),
            token_inputs,
            "decoder",
            "moe",
        ),
        Architecture(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            decoder(
                T.DeepseekV3Config,
                num_key_value_heads=4,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_group=1,
                topk_group=1,
                moe_intermediate_size=16,
                first_k_dense_replace=1,
                kv_lora_rank=8,
                q_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
            ),
            token_inputs,
            "decoder",
            "moe",
        ),
        # state space
        Architecture(
            "mamba",
            "MambaForCausalLM",
            lambda: T.MambaConfig(
                hidden_size=HIDDEN,
                state_size=4,
                num_hidden_layers=2,
                vocab_size=VOCAB,
                expand=2,
                conv_kernel=4,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            token_inputs,
            "decoder",
            "ssm",
        ),
        # encoder-decoder
        Architecture(
            "t5",
            "T5ForConditionalGeneration",
            lambda: T.T5Config(
                d_model=HIDDEN,
                d_ff=48,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                vocab_size=VOCAB,
                decoder_start_token_id=0,
            ),
            seq2seq_inputs,
            "seq2seq",
            "seq2seq",
        ),
        Architecture(
            "bart",
            "BartForConditionalGeneration",
            lambda: T.BartConfig(
                d_model=HIDDEN,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            ),
            seq2seq_inputs,
            "seq2seq",
            "seq2seq",
        ),
        Architecture(
            "whisper",
            "WhisperForConditionalGeneration",
            lambda: T.WhisperConfig(
                d_model=HIDDEN,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
                vocab_size=VOCAB,
                num_mel_bins=8,
                max_source_positions=8,
                max_target_positions=32,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                suppress_tokens=None,
                begin_suppress_tokens=None,
            ),
            whisper_inputs,
            "seq2seq",
            "seq2seq",
        ),
        # encoders
        Architecture(
            "bert",
            "BertForSequenceClassification",
            encoder_config(T.BertConfig),
            token_inputs,
            None,
            "encoder",
        ),
        Architecture(
            "roberta",
            "RobertaForSequenceClassification",
            encoder_config(T.RobertaConfig, pad_token_id=1),
            token_inputs,
            None,
            "encoder",
        ),
        Architecture(
            "distilbert",
            "DistilBertForSequenceClassification",
            lambda: T.DistilBertConfig(
                dim=HIDDEN,
                n_layers=2,
                n_heads=2,
                hidden_dim=48,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                num_labels=3,
                pad_token_id=0,
            ),
            token_inputs,
            None,
            "encoder",
        ),
        # vision
        Architecture(
            "vit",
            "ViTForImageClassification",
            lambda: T.ViTConfig(
                image_size=16,
                patch_size=8,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=48,
                num_labels=3,
            ),
            image_inputs,
            None,
            "vision",
        ),
        Architecture(
            "convnext",
            "ConvNextForImageClassification",
            lambda: T.ConvNextConfig(
                num_channels=3,
                patch_size=4,
                num_stages=2,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                num_labels=3,
                layer_scale_init_value=0.5,  # 1e-6 by default: every block nearly off
            ),
            image_inputs,
            None,
            "vision",
        ),
        Architecture(
            "swin",
            "SwinForImageClassification",
            lambda: T.SwinConfig(
                image_size=16,
                patch_size=2,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=4,
                num_labels=3,
            ),
            image_inputs,
            None,
            "vision",
        ),
        # audio
        Architecture(
            "wav2vec2",
            "Wav2Vec2ForCTC",
            lambda: T.Wav2Vec2Config(
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=48,
                conv_dim=(16, 16),
                conv_stride=(5, 4),
                conv_kernel=(10, 4),
                num_feat_extract_layers=2,
                num_conv_pos_embeddings=4,
                num_conv_pos_embedding_groups=2,
                vocab_size=VOCAB,
                pad_token_id=0,
            ),
            audio_inputs,
            None,
            "audio",
        ),
        # multimodal
        Architecture(
            "llava",
            "LlavaForConditionalGeneration",
            lambda: T.LlavaConfig(
                vision_config=T.CLIPVisionConfig(**clip_vision()),
                text_config=T.LlamaConfig(**DECODER),
                image_token_id=LLAVA_IMAGE_TOKEN,
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
                projector_hidden_act="gelu",
            ),
            llava_inputs,
            "decoder",
            "multimodal",
        ),
        Architecture(
            "clip",
            "CLIPModel",
            lambda: T.CLIPConfig(
                text_config=dict(
                    hidden_size=HIDDEN,
                    intermediate_size=48,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    vocab_size=VOCAB,
                    max_position_embeddings=64,
                    projection_dim=HIDDEN,
                    pad_token_id=0,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
                vision_config=clip_vision(),
                projection_dim=HIDDEN,
            ),
            clip_inputs,
            None,
            "multimodal",
        ),
    ]
}


@functools.cache
def config_of(name: str) -> transformers.PretrainedConfig:
    """The architecture's config, made once (``build`` never mutates it)."""
    config = ARCHITECTURES[name].config()
    config._attn_implementation = "eager"
    return config


def build(name: str, seed: int = 0) -> nn.Module:
    """A new model of architecture ``name``, in eval mode; the same seed gives the same model."""
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model_class)(config_of(name))
    return model.eval()


def inputs_of(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for architecture ``name`` (the same seed gives the same inputs)."""
    return ARCHITECTURES[name].inputs(torch.Generator().manual_seed(seed))


def main_output(output) -> torch.Tensor:
    """The tensor a model's output is judged by: its logits, else its last hidden state."""
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The layers of the model's stacks: the members of every ``nn.ModuleList`` whose members
    are all of one class (decoder layers, encoder blocks, stages), outermost lists only."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in taken):
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1:
                blocks.extend(module)
                taken.append(path)
    return blocks
