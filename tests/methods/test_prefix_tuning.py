"""PrefixTuning on tiny transformers models: what PEFT computes, generate(), training, files."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo as dynamo
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch._dynamo.testing import CompileCounter

import deltahooks as dh

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_models import MODELS, skip_where_peft_misses_the_cache  # noqa: E402

TEXT_MODELS = ["gpt2", "llama", "opt", "bert", "t5"]
DECODERS = ["gpt2", "llama", "opt"]
PEFT_TASKS = {
    "gpt2": "CAUSAL_LM",
    "llama": "CAUSAL_LM",
    "opt": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
}
P = 4  # prefix length
MLP = ["prefix_embedding", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_out_bias"]


def build(name, seed=0):
    """A tiny model in eval mode, a padded batch and labels that fit its task."""
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    if name != "bert":  # greedy runs to max_new_tokens; T5's decoder starts at 0
        model.generation_config.eos_token_id = None
        model.generation_config.decoder_start_token_id = 0
        model.config.decoder_start_token_id = 0
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :2] = 0  # a left-padded second row
    inputs = {**inputs, "attention_mask": mask}
    if name == "bert":
        labels = torch.tensor([0, 2])
    elif name == "t5":
        labels = inputs["decoder_input_ids"]
    else:
        labels = inputs["input_ids"]
    return model.eval(), inputs, labels


def real_inputs(inputs):
    """What generate() takes: the encoder/prompt inputs only."""
    return {k: v for k, v in inputs.items() if k != "decoder_input_ids"}


def peft_twin(name, model, delta, reparameterize):
    """PEFT's prefix tuning on a copy of the base model, holding the same prefixes.

    For a seq2seq model PEFT's cache gives decoder layer ``l`` the prefixes it stores for
    layer ``2l mod layers`` (its self- and cross-attention share one tensor, and the cross
    part is dropped); ours gives each layer its own, so the test makes them agree first.
    """
    with delta.disabled():
        twin = copy.deepcopy(model)
    dh.detach(twin)
    config = peft.PrefixTuningConfig(
        task_type=PEFT_TASKS[name],
        num_virtual_tokens=P,
        prefix_projection=reparameterize,
        encoder_hidden_size=8,
    )
    wrapped = peft.get_peft_model(twin, config)
    encoder = wrapped.prompt_encoder["default"]
    state = delta.state_dict(keep_vars=True)
    with torch.no_grad():
        if name == "t5":
            layers = model.config.num_layers
            prefixes = state["prefixes"].view(P, layers, -1)
            for layer in range(layers):
                prefixes[:, layer] = prefixes[:, 2 * layer % layers]
        if reparameterize:
            encoder.embedding.weight.copy_(state["prefix_embedding"])
            encoder.transform[0].weight.copy_(state["mlp_in"])
            encoder.transform[0].bias.copy_(state["mlp_in_bias"])
            encoder.transform[2].weight.copy_(state["mlp_out"])
            encoder.transform[2].bias.copy_(state["mlp_out_bias"])
        else:
            encoder.embedding.weight.copy_(state["prefixes"])
    return wrapped


# ------------------------------------------------------------------------------ parity
# PEFT's seq2seq layout reuses layers (see peft_twin): T5 is checked on direct prefixes only
PARITY = [(n, r) for n in TEXT_MODELS for r in (False, True) if not (n == "t5" and r)]


@pytest.mark.parametrize(("name", "reparameterize"), PARITY)
def test_same_logits_and_loss_as_peft(name, reparameterize):
    model, inputs, labels = build(name)
    if name == "bert":  # PEFT checks BERT's forward for past_key_values before it runs
        skip_where_peft_misses_the_cache(model)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, reparameterize=reparameterize, hidden=8))
    wrapped = peft_twin(name, model, delta, reparameterize)
    with torch.no_grad():
        ours = model(**inputs, labels=labels)
        theirs = wrapped(**inputs, labels=labels)
    if name in DECODERS:  # the real tokens only: the prefixes are keys and values
        assert ours.logits.shape[1] == inputs["input_ids"].shape[1]
    assert_outputs_equal(ours.logits, theirs.logits)
    assert_outputs_equal(ours.loss, theirs.loss)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_matches_peft(name, beams):
    model, inputs, _ = build(name)
    skip_where_peft_misses_the_cache(model)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, reparameterize=False))
    wrapped = peft_twin(name, model, delta, reparameterize=False)
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "num_beams": beams}
    ours = model.generate(**real_inputs(inputs), **options)
    theirs = wrapped.generate(**real_inputs(inputs), **options)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ generate = manual loop
def greedy_by_hand(model, name, inputs, steps):
    """Greedy decoding without a cache: each step runs the whole sequence (prefixes again)."""
    logits = []
    with torch.no_grad():
        if name == "t5":
            seq = torch.zeros_like(inputs["input_ids"][:, :1])
            for _ in range(steps):
                out = model(**real_inputs(inputs), decoder_input_ids=seq, use_cache=False)
                logits.append(out.logits[:, -1])
                seq = torch.cat((seq, logits[-1].argmax(-1, keepdim=True)), dim=1)
            return seq, logits
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them
            out = model(input_ids=seq, attention_mask=mask, position_ids=positions, use_cache=False)
            logits.append(out.logits[:, -1])
            seq = torch.cat((seq, logits[-1].argmax(-1, keepdim=True)), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return seq, logits


@pytest.mark.parametrize("name", [*DECODERS, "t5"])
def test_generate_with_cache_equals_a_manual_greedy_loop(name):
    """The first call fills the cache with the prefixes; later steps only shift masks."""
    model, inputs, _ = build(name)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    steps = 6
    options = {"max_new_tokens": steps, "do_sample": False, "pad_token_id": 0}
    out = model.generate(
        **real_inputs(inputs), **options, output_scores=True, return_dict_in_generate=True
    )
    by_hand, logits = greedy_by_hand(model, name, inputs, steps)
    assert torch.equal(out.sequences, by_hand)
    for cached, full in zip(out.scores, logits, strict=True):
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # without a cache generate() reruns the whole sequence each step: the cache the model
    # hands back anyway must not be taken for a continuation
    uncached = model.generate(**real_inputs(inputs), **options, use_cache=False)
    assert torch.equal(uncached, out.sequences)
    with delta.disabled():  # the prefixes change what is generated
        _, base = greedy_by_hand(model, name, inputs, 1)
    assert not torch.allclose(base[0], logits[0])


# --------------------------------------------------------------- the lifecycle promises
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_disabled_is_the_base_model_and_detach_restores_it(name):
    model, inputs, labels = build(name)
    before = snapshot(model)
    with torch.no_grad():
        base = model(**inputs, labels=labels)
        delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
        prefixed = model(**inputs, labels=labels)
        with delta.disabled():
            assert_outputs_equal(model(**inputs, labels=labels).logits, base.logits)
    assert not torch.equal(prefixed.loss, base.loss)
    delta.detach()
    assert_restored(model, before)
    with torch.no_grad():
        assert_outputs_equal(model(**inputs, labels=labels).logits, base.logits)


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_only_the_prefix_learns_and_the_loss_falls(name):
    model, inputs, labels = build(name)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=16))
    optimizer = torch.optim.AdamW(delta.parameters(), lr=0.01)

    def loss_without_dropout():
        with torch.no_grad():
            return model.eval()(**inputs, labels=labels).loss.item()

    before = loss_without_dropout()
    model.train()
    for _ in range(6):
        model(**inputs, labels=labels).loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        assert with_grad == [f"dh__default__{name}" for name in MLP]
        optimizer.step()
        optimizer.zero_grad()
    assert loss_without_dropout() < before


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_a_file_holds_the_final_prefixes_and_loads_exactly(name, tmp_path):
    model, inputs, _ = build(name)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=16))
    path = tmp_path / "prefix.safetensors"
    delta.save(path)
    assert sorted(delta.state_dict()) == sorted(MLP)  # the live delta keeps its MLP
    fresh, _, _ = build(name)
    before = snapshot(fresh)
    loaded = dh.load(fresh, path)
    assert loaded.specs[0] == dh.PrefixTuning(
        targets=dh.Paths([""]), num_tokens=P, hidden=16, reparameterize=False
    )
    assert list(loaded.state_dict()) == ["prefixes"]
    with torch.no_grad():
        assert_outputs_equal(fresh(**inputs).logits, model(**inputs).logits)
    loaded.save(tmp_path / "again.safetensors")  # a direct delta saves as it is
    prefixes = loaded.state_dict()["prefixes"]
    loaded.detach()
    assert_restored(fresh, before)
    again = dh.load(fresh, tmp_path / "again.safetensors")
    assert_outputs_equal(again.state_dict()["prefixes"], prefixes)


def test_a_deep_copy_or_pickle_of_the_model_carries_working_prefixes():
    model, inputs, _ = build("llama")
    dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        want = model(**inputs).logits
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert_outputs_equal(twin(**inputs).logits, want)
            dh.detach(twin)
            assert not torch.equal(twin(**inputs).logits, want)


def checkpointing_grads(name, checkpointing, reentrant, reparameterize=True):
    """Loss and delta gradients of one training step, dropout off (so runs compare)."""
    model, inputs, labels = build(name)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8, reparameterize=reparameterize))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {key: p.grad for key, p in delta.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    ("name", "reparameterize"), [(n, True) for n in TEXT_MODELS] + [("llama", False)]
)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name, reparameterize, reentrant):
    """Checkpointed layers replay with the same prefixes; GPT-2, whose model passes its
    layers no cache while checkpointing, gets them handed to each layer."""
    plain_loss, plain = checkpointing_grads(name, False, reentrant, reparameterize)
    loss, grads = checkpointing_grads(name, True, reentrant, reparameterize)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain.keys()
    for key, grad in plain.items():
        assert grads[key] is not None and grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_under_checkpointing_the_loss_falls_and_detach_restores(name):
    model, inputs, labels = build(name)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    before = snapshot(model)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=16))
    optimizer = torch.optim.AdamW(delta.parameters(), lr=0.01)

    def eval_loss():
        with torch.no_grad():
            return model.eval()(**inputs, labels=labels).loss.item()

    start = eval_loss()
    model.train()
    for _ in range(6):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss() < start
    delta.detach()
    assert_restored(model, before)
    assert all("_can_checkpoint_with_cache" not in m.__dict__ for m in model.modules())


def test_the_layers_keep_the_cache_only_while_the_delta_is_active():
    """Disabled, the layers drop a cache as transformers means them to, so the base
    trains exactly as without a delta; active, they keep the replayable one."""
    (model, inputs, labels), (twin, _, _) = build("llama"), build("llama")
    layers = model.model.layers
    assert not layers[0]._can_checkpoint_with_cache
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    assert all(layer._can_checkpoint_with_cache for layer in layers)
    with delta.disabled():
        assert not any(layer._can_checkpoint_with_cache for layer in layers)
    for each in (model, twin):
        each.train()
        each.gradient_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(3)
    with delta.disabled():
        base_loss = model(**inputs, labels=labels).loss
    torch.manual_seed(3)
    torch.testing.assert_close(base_loss, twin(**inputs, labels=labels).loss, rtol=0, atol=0)


def test_continuing_a_filled_cache_in_a_checkpointed_training_call_is_refused():
    """The backward pass would replay the layers' writes into the caller's cache."""
    model, inputs, _labels = build("llama")
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    before = snapshot(model)
    step = {"input_ids": inputs["input_ids"][:, :1], "past_key_values": cache}
    with pytest.raises(dh.DeltaStateError, match="gradient checkpointing"):
        model(**step)
    assert_restored(model, before)
    delta.detach()


def test_compiled_model_matches_eager_with_the_delta_on_and_off():
    """fullgraph: no graph break (the root's pre-hook is a frame of its own, see
    test_prompt_tuning); with ``wrap_top_frame`` the hook and the model are one graph."""
    model, inputs, _ = build("llama")
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            with delta.disabled():
                base = model(**inputs).logits
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(**inputs).logits, eager)
            with delta.disabled():
                torch.testing.assert_close(compiled(**inputs).logits, base)
            dynamo.reset()
            counter = CompileCounter()
            with dynamo.config.patch(wrap_top_frame=True):
                compiled = torch.compile(model, fullgraph=True, backend=counter)
                torch.testing.assert_close(compiled(**inputs).logits, eager)
            assert counter.frame_count == 1
    finally:
        dynamo.reset()


def test_the_prefixes_take_the_dtype_of_the_model():
    model, inputs, labels = build("llama")
    model.to(torch.bfloat16)
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    assert {t.dtype for t in delta.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(**inputs, labels=labels).logits.dtype == torch.bfloat16


def test_given_positions_move_past_the_prefix():
    model, inputs, _ = build("gpt2")
    dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        assert_outputs_equal(
            model(input_ids=ids, position_ids=positions).logits, model(input_ids=ids).logits
        )


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": 0}, "num_tokens=0 must be a positive integer"),
        ({"hidden": -1}, "hidden=-1 must be a positive integer"),
        ({"reparameterize": "yes"}, "reparameterize='yes' must be True or False"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(dh.SpecError, match=message):
        dh.PrefixTuning(**kwargs)


def sliding_window_mistral():
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        sliding_window=4,
    )
    return transformers.MistralForCausalLM(config)


@pytest.mark.parametrize(
    ("make", "spec", "error", "message"),
    [
        (lambda: MODELS["vit"]()[0], dh.PrefixTuning(), dh.UnsupportedModuleError, "past_key"),
        (sliding_window_mistral, dh.PrefixTuning(), dh.UnsupportedModuleError, "SlidingWindow"),
        (
            lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
            dh.PrefixTuning(),
            dh.UnsupportedModuleError,
            "not a transformers model",
        ),
        (
            lambda: MODELS["llama"]()[0],
            dh.PrefixTuning(targets=dh.Paths(["", "model"])),
            dh.SpecError,
            "one module",
        ),
    ],
)
def test_unsupported_models_are_refused_at_attach_and_left_unchanged(make, spec, error, message):
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        dh.attach(model, spec)
    assert_restored(model, before)
    assert dh.deltas(model) == {}


def test_a_4d_mask_is_refused_with_the_fix():
    model, inputs, _ = build("llama")
    dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    with pytest.raises(dh.DeltaStateError, match="2-D attention masks"):
        model(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 1, 7, 11))


def test_prefixes_of_latent_attention_do_not_export_to_peft(tmp_path):
    """DeepSeek-V3 caches key latents and rotary keys of different sizes; PEFT's prefixes
    are keys and values of one size, so the export says why not, and delta.save() works."""
    from test_generation_cache import deepseek_v3

    torch.manual_seed(0)
    model = deepseek_v3().eval()
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    with pytest.raises(dh.UnsupportedOperationError, match="keys and values of one size"):
        delta.save_peft(tmp_path / "peft")
    delta.save(tmp_path / "delta.safetensors")
    assert (tmp_path / "delta.safetensors").stat().st_size > 0


def test_whisper_sees_the_prefixes_without_a_cache_too():
    """Whisper's decoder hands its layers the cache only with ``use_cache`` on; a call that
    asks for none (generate(use_cache=False), a plain forward) must still see the prefixes."""
    from architectures import build as build_arch
    from architectures import inputs_of

    model = build_arch("whisper")
    inputs = inputs_of("whisper")
    delta = dh.attach(model, dh.PrefixTuning(num_tokens=P, hidden=8))
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits
        plain = model(**inputs, use_cache=False).logits
        with delta.disabled():
            base = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(plain, cached, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, base)
    features = {"input_features": inputs["input_features"]}
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    assert torch.equal(
        model.generate(**features, **options, use_cache=False),
        model.generate(**features, **options),
    )
