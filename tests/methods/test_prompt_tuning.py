"""PromptTuning on tiny transformers models: what PEFT computes, generate(), training, files."""

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
P = 4  # prompt length: tiny models allow 32 positions


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


def real_inputs(name, inputs):
    """What generate() takes: the encoder/prompt inputs only."""
    return {k: v for k, v in inputs.items() if k != "decoder_input_ids"}


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_same_logits_and_loss_as_peft(name):
    """PEFT keeps the virtual positions in a causal LM's logits; so do we."""
    model, inputs, labels = build(name)
    twin = copy.deepcopy(model)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
    wrapped = peft.get_peft_model(
        twin, peft.PromptTuningConfig(task_type=PEFT_TASKS[name], num_virtual_tokens=P)
    )
    with torch.no_grad():  # PEFT's seq2seq encoder prompt is the first P of its rows
        wrapped.prompt_encoder["default"].embedding.weight[:P].copy_(
            delta.state_dict()["prompt_embeddings"]
        )
        ours = model(**inputs, labels=labels)
        theirs = wrapped(**inputs, labels=labels)
    if name in DECODERS:
        assert ours.logits.shape[1] == P + inputs["input_ids"].shape[1]
    assert_outputs_equal(ours.logits, theirs.logits)
    assert_outputs_equal(ours.loss, theirs.loss)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_matches_peft(name, beams):
    """Unpadded: PEFT drops the position ids generate() counts past left padding, we shift
    them (see test_generate_with_cache_equals_a_manual_greedy_loop), which differs on
    padded rows of models with absolute positions."""
    model, inputs, _ = build(name)
    skip_where_peft_misses_the_cache(model)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    twin = copy.deepcopy(model)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P, init="vocab"))
    wrapped = peft.get_peft_model(
        twin, peft.PromptTuningConfig(task_type=PEFT_TASKS[name], num_virtual_tokens=P)
    )
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight[:P].copy_(
            delta.state_dict()["prompt_embeddings"]
        )
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "num_beams": beams}
    ours = model.generate(**real_inputs(name, inputs), **options)
    theirs = wrapped.generate(**real_inputs(name, inputs), **options)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ generate = manual loop
def greedy_by_hand(model, name, inputs, steps):
    """Greedy decoding without a cache: each step runs the whole sequence (prompt again)."""
    logits = []
    with torch.no_grad():
        if name == "t5":
            seq = torch.zeros_like(inputs["input_ids"][:, :1])
            for _ in range(steps):
                out = model(**real_inputs(name, inputs), decoder_input_ids=seq, use_cache=False)
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
    """The first call gets the prompt; cached steps only shift masks and positions."""
    model, inputs, _ = build(name)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P, init="vocab"))
    if name != "t5":
        inputs.pop("decoder_input_ids", None)
    steps = 6
    out = model.generate(
        **real_inputs(name, inputs),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    by_hand, logits = greedy_by_hand(model, name, inputs, steps)
    assert torch.equal(out.sequences, by_hand)
    for cached, full in zip(out.scores, logits, strict=True):
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    with delta.disabled():  # the prompt changes what is generated
        _, base = greedy_by_hand(model, name, inputs, 1)
    assert not torch.allclose(base[0], logits[0])


# --------------------------------------------------------------- the lifecycle promises
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_disabled_is_the_base_model_and_detach_restores_it(name):
    model, inputs, labels = build(name)
    before = snapshot(model)
    with torch.no_grad():
        base = model(**inputs, labels=labels)
        delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
        prompted = model(**inputs, labels=labels)
        with delta.disabled():
            assert_outputs_equal(model(**inputs, labels=labels), base)
    assert not torch.equal(prompted.loss, base.loss)
    delta.detach()
    assert_restored(model, before)
    with torch.no_grad():
        assert_outputs_equal(model(**inputs, labels=labels), base)


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_only_the_prompt_learns_and_the_loss_falls(name):
    model, inputs, labels = build(name)
    model.train()
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
    optimizer = torch.optim.AdamW(delta.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        assert with_grad == ["dh__default__prompt_embeddings"]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_save_and_load_reproduce_outputs(name, tmp_path):
    model, inputs, _ = build(name)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P, init="vocab"))
    with torch.no_grad():
        delta.parameters().__next__().add_(0.5)  # a trained prompt, not the initial one
    delta.save(tmp_path / "prompt.safetensors")
    fresh, _, _ = build(name)
    loaded = dh.load(fresh, tmp_path / "prompt.safetensors")
    assert loaded.specs[0] == delta.specs[0]
    with torch.no_grad():
        assert_outputs_equal(fresh(**inputs).logits, model(**inputs).logits)


def test_a_deep_copy_or_pickle_of_the_model_carries_a_working_prompt():
    model, inputs, _ = build("t5")
    dh.attach(model, dh.PromptTuning(num_tokens=P, init="vocab"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        want = model(**inputs).logits
        for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert_outputs_equal(twin(**inputs).logits, want)
            dh.detach(twin)
            assert not torch.equal(twin(**inputs).logits, want)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model, inputs, labels = build("llama")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
        model(**inputs, labels=labels).loss.backward()
        grads.append(next(delta.parameters()).grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_compiled_model_matches_eager_with_the_delta_on_and_off():
    """fullgraph: no graph break. torch.compile(module) runs a root's own pre-hooks as a
    frame of their own (torch: "invoke hooks outside of dynamo"), so there the prompt is a
    small graph before the model's."""
    model, inputs, _ = build("llama")
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            with delta.disabled():
                base = model(**inputs).logits
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(**inputs).logits, eager)
            with delta.disabled():
                torch.testing.assert_close(compiled(**inputs).logits, base)
    finally:
        dynamo.reset()


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_prompt_and_model_compile_into_one_graph(name):
    """With ``wrap_top_frame`` the root hook is traced with the model: one graph in all."""
    model, inputs, _ = build(name)
    dh.attach(model, dh.PromptTuning(num_tokens=P))
    counter = CompileCounter()
    try:
        with torch.no_grad(), dynamo.config.patch(wrap_top_frame=True):
            compiled = torch.compile(model, fullgraph=True, backend=counter)
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)
        assert counter.frame_count == 1
    finally:
        dynamo.reset()


# ----------------------------------------------------------------------------- details
def test_positional_call_and_inputs_embeds_get_the_same_prompt():
    model, inputs, _ = build("llama")
    dh.attach(model, dh.PromptTuning(num_tokens=P))
    ids = inputs["input_ids"]
    with torch.no_grad():
        by_keyword = model(input_ids=ids).logits
        assert_outputs_equal(model(ids).logits, by_keyword)
        embeds = model.get_input_embeddings()(ids)
        assert_outputs_equal(model(inputs_embeds=embeds).logits, by_keyword)


def test_given_positions_and_token_types_are_extended():
    """Positions counting from 0 give what the model computes without them (PEFT drops them)."""
    model, inputs, _ = build("bert")
    dh.attach(model, dh.PromptTuning(num_tokens=P))
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        assert_outputs_equal(
            model(input_ids=ids, position_ids=positions).logits, model(input_ids=ids).logits
        )
        zeros = torch.zeros_like(ids)
        assert_outputs_equal(
            model(input_ids=ids, token_type_ids=zeros).logits, model(input_ids=ids).logits
        )


@pytest.mark.parametrize(
    ("init", "init_text", "rows"),
    [
        ("vocab", None, None),
        ("text", [5, 6, 7], [5, 6, 7, 5]),
        ("text", [1, 2, 3, 4, 9], [1, 2, 3, 4]),
    ],
)
def test_inits_copy_rows_of_the_embedding_matrix(init, init_text, rows):
    model, _, _ = build("gpt2")
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P, init=init, init_text=init_text))
    prompt = delta.state_dict()["prompt_embeddings"]
    table = model.get_input_embeddings().weight
    if rows is None:  # every prompt vector is some row of the table
        assert all(any(torch.equal(v, row) for row in table) for v in prompt)
    else:
        assert_outputs_equal(prompt, table[rows])


def test_the_prompt_takes_the_dtype_of_the_embeddings():
    model, inputs, labels = build("llama")
    model.to(torch.bfloat16)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=P))
    assert delta.state_dict()["prompt_embeddings"].dtype == torch.bfloat16
    with torch.no_grad():
        assert model(**inputs, labels=labels).logits.dtype == torch.bfloat16
    model.to(torch.float32)  # moves with the model, like every delta tensor
    assert delta.state_dict()["prompt_embeddings"].dtype == torch.float32


def test_random_init_has_the_scale_of_the_embeddings():
    model, _, _ = build("llama")
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.02)
    delta = dh.attach(model, dh.PromptTuning(num_tokens=64))
    assert 0.015 < float(delta.state_dict()["prompt_embeddings"].std()) < 0.025


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": 0}, "num_tokens=0 must be a positive integer"),
        ({"num_tokens": True}, "num_tokens=True must be a positive integer"),
        ({"init": "zeros"}, "init='zeros' is unknown"),
        ({"init": "text"}, "needs init_text"),
        ({"init": "text", "init_text": "Classify:"}, "token ids, not text"),
        ({"init": "text", "init_text": [1, -2]}, "non-negative integers"),
        ({"init_text": [1, 2]}, "only with init='text'"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(dh.SpecError, match=message):
        dh.PromptTuning(**kwargs)


@pytest.mark.parametrize(
    ("name", "spec", "error", "message"),
    [
        ("vit", dh.PromptTuning(num_tokens=P), dh.UnsupportedModuleError, "get_input_embeddings"),
        ("llama", dh.PromptTuning(targets=["lm_head"]), dh.UnsupportedModuleError, "'lm_head'"),
        ("llama", dh.PromptTuning(targets=dh.Paths(["", "model"])), dh.SpecError, "one module"),
        (
            "gpt2",
            dh.PromptTuning(num_tokens=P, init="text", init_text=[3, 500]),
            dh.SpecError,
            r"token ids \[500\] outside the vocabulary of 97",
        ),
    ],
)
def test_unsupported_targets_leave_the_model_unchanged(name, spec, error, message):
    torch.manual_seed(0)
    model, _ = MODELS[name]()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        dh.attach(model, spec)
    assert_restored(model, before)
    assert dh.deltas(model) == {}


def test_a_model_without_inputs_embeds_is_refused_at_attach():
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids):
            return self.embed(input_ids)

    model = Tokens()
    before = snapshot(model)
    with pytest.raises(
        dh.UnsupportedModuleError, match=r"takes no embeddings argument.*inputs_embeds"
    ):
        dh.attach(model, dh.PromptTuning(num_tokens=2))
    assert_restored(model, before)


def test_a_4d_mask_is_refused_with_the_fix():
    model, inputs, _ = build("llama")
    dh.attach(model, dh.PromptTuning(num_tokens=P))
    mask = torch.ones(2, 1, 7, 7)
    with pytest.raises(dh.DeltaStateError, match="2-D attention masks"):
        model(input_ids=inputs["input_ids"], attention_mask=mask)
