"""Cached generation is exact: with prompt or prefix tuning attached, every step that
``generate()`` takes through its cache gives the logits of a plain forward (no cache) of
the model over the same tokens. Run on tiny models of several architectures, under
whichever transformers is installed (its cache argument has had several names).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import deltahooks as dh

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 4
SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 32}


def llama():
    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **SMALL)
    return transformers.LlamaForCausalLM(config)


def qwen3():
    config = transformers.Qwen3Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, **SMALL
    )
    return transformers.Qwen3ForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)
    return transformers.GPT2LMHeadModel(config)


def opt():
    config = transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


def falcon():
    """Falcon-7B's layout: multi-query attention, one key/value head for all four queries."""
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, new_decoder_architecture=False,
    )  # fmt: skip
    return transformers.FalconForCausalLM(config)


def falcon_grouped():
    """Falcon-40B's layout: grouped key/value heads in the new decoder architecture."""
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True,
    )  # fmt: skip
    return transformers.FalconForCausalLM(config)


def deepseek_v3():
    """Multi-head latent attention: the cache holds compressed latents, not per-head keys."""
    config = transformers.DeepseekV3Config(
        num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        first_k_dense_replace=1, **SMALL,
    )  # fmt: skip
    return transformers.DeepseekV3ForCausalLM(config)


def gemma2():
    """Alternating sliding-window and full attention layers."""
    config = transformers.Gemma2Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4, **SMALL
    )
    return transformers.Gemma2ForCausalLM(config)


def mamba():
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2
    )
    return transformers.MambaForCausalLM(config)


def t5():
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def bart():
    config = transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        decoder_start_token_id=2,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


CAUSAL = {
    "llama": llama,
    "qwen3": qwen3,
    "gpt2": gpt2,
    "opt": opt,
    "falcon": falcon,
    "falcon_grouped": falcon_grouped,
    "deepseek_v3": deepseek_v3,
    "gemma2": gemma2,
    "mamba": mamba,
}
ENCODER_DECODER = {"t5": t5, "bart": bart}
MODELS = {**CAUSAL, **ENCODER_DECODER}
# PrefixTuning needs a full-attention cache in every layer (README, known limits): the
# refusal names the cache layers that are not
PREFIX_REFUSED = {"mamba": "LinearAttentionLayer", "gemma2": "DynamicSlidingWindowLayer"}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.generation_config.eos_token_id = None  # greedy runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def spec(method: str):
    if method == "prompt":
        return dh.PromptTuning(num_tokens=3)
    return dh.PrefixTuning(num_tokens=3, hidden=8)


def plain_logits(name: str, model, source: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """The last position's logits of one forward over ``sequence``, without any cache."""
    if name in ENCODER_DECODER:
        out = model(input_ids=source, decoder_input_ids=sequence, use_cache=False)
    else:
        out = model(input_ids=sequence, use_cache=False)
    return out.logits[:, -1]


CASES = [
    (name, method)
    for name in MODELS
    for method in ("prompt", "prefix")
    if not (method == "prefix" and name in PREFIX_REFUSED)
]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_every_cached_step_equals_a_plain_forward(name, method):
    model = build(name)
    source = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain_before = plain_logits(
            name, model, source, source if name in CAUSAL else source[:, :1]
        )
    torch.manual_seed(2)
    delta = dh.attach(model, spec(method))
    with torch.no_grad():
        out = model.generate(
            input_ids=source,
            attention_mask=torch.ones_like(source),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert len(out.logits) == NEW_TOKENS
        start = source.shape[1] if name in CAUSAL else 1  # the decoder's start token
        for step, logits in enumerate(out.logits):
            expected = plain_logits(name, model, source, out.sequences[:, : start + step])
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5, msg=f"step {step}")
        # the delta acts: the first step is not what the bare model computes
        if name in CAUSAL:
            assert not torch.allclose(out.logits[0], plain_before, atol=1e-4)
    delta.detach()


@pytest.mark.parametrize("name", sorted(PREFIX_REFUSED))
def test_prefixes_are_refused_where_a_layer_has_no_full_attention_cache(name):
    model = build(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(dh.UnsupportedModuleError, match=PREFIX_REFUSED[name]):
        dh.attach(model, spec("prefix"))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize(("name", "method"), CASES)
def test_trains_saves_loads_and_detaches_on_every_architecture(name, method, tmp_path):
    """The same models: a training step moves only the delta (every tensor of it gets a
    gradient), a file loads into a fresh model with equal outputs, detach restores it."""
    model = build(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    if name in ENCODER_DECODER:
        inputs["labels"] = ids[:, :3].contiguous()  # the model shifts them into its decoder
    torch.manual_seed(2)
    delta = dh.attach(model, spec(method))
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    model.train()
    model(**inputs).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if n.startswith("dh__")}
    assert all(p.grad.abs().sum() > 0 for p in delta.parameters())
    optimizer.step()
    model.eval()
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    fresh = build(name)
    dh.load(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)
    delta.detach()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("spelling", ["past_key_values", "forward's own"])
def test_a_manual_continuation_works_under_either_name_of_the_cache(method, spelling):
    """A user's own decoding loop may pass the cache as ``past_key_values`` (which
    transformers 5.24 still accepts for its renamed ``cache``) or under the forward's name."""
    from deltahooks.methods._calls import call_names

    model = build("llama")
    dh.attach(model, spec(method))
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    name = "past_key_values" if spelling == "past_key_values" else call_names(model).cache
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.24 warns about the old name
        first = model(input_ids=ids, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        step = model(input_ids=token, use_cache=True, **{name: cache}).logits[:, -1]
        plain = model(input_ids=torch.cat((ids, token), 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, plain, rtol=1e-4, atol=1e-5)


def test_call_names_follow_each_spelling_of_the_cache():
    from deltahooks.methods._calls import CACHE_NAMES, call_names

    for cache_name in CACHE_NAMES:
        namespace: dict = {}
        exec(
            f"def forward(self, input_ids, {cache_name}=None, attention_mask=None): pass", namespace
        )
        module = type("Layer", (torch.nn.Module,), {"forward": namespace["forward"]})()
        names = call_names(module)
        assert names.cache == cache_name
        assert names.positional == ("input_ids", cache_name, "attention_mask")
        kwargs = {"past_key_values": "old", "cache_params": "older"}
        names.set_cache(kwargs, "new")
        assert kwargs == {cache_name: "new"}
        assert names.get_cache(kwargs) == "new"
