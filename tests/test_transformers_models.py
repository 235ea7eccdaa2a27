"""The lifecycle promises on tiny random transformers models built from configs (no download)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import assert_outputs_equal, assert_restored, snapshot

import deltahooks as dh

transformers = pytest.importorskip("transformers")


from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# what dh.Full trains: the task head where it is untied, else the final norm (a tied head
# shares its weight with the input embeddings, and merging into it is refused on purpose)
HEADS = {
    "gpt2": "transformer.ln_f",
    "llama": "lm_head",
    "bert": "classifier",
    "t5": "decoder.final_layer_norm",
    "vit": "classifier",
    "opt": "model.decoder.final_layer_norm",
}


@pytest.fixture(params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    model, inputs = MODELS[request.param]()
    return request.param, model.eval(), inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def specs(name, init="random"):
    return [dh.LoRA(targets="all-linear", r=4, alpha=8, init=init), dh.Full(targets=[HEADS[name]])]


def train_step(model, inputs):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(**inputs).logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def test_attach_train_detach_restores_everything(case):
    name, model, inputs = case
    before = snapshot(model)
    base = logits(model, inputs)
    delta = dh.attach(model, specs(name))
    assert not torch.equal(logits(model, inputs), base)
    train_step(model, inputs)
    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(logits(model, inputs), base)


def test_default_init_leaves_logits_unchanged(case):
    _, model, inputs = case
    base = logits(model, inputs)
    dh.attach(model, dh.LoRA(targets="all-linear", r=4))
    assert_outputs_equal(logits(model, inputs), base)


def test_save_and_load_on_a_fresh_copy(case, tmp_path):
    name, model, inputs = case
    fresh = copy.deepcopy(model)
    delta = dh.attach(model, specs(name))
    train_step(model, inputs)
    delta.save(tmp_path / "d.safetensors")
    dh.load(fresh, tmp_path / "d.safetensors")
    assert_outputs_equal(logits(fresh, inputs), logits(model, inputs))


def test_merge_matches_hooks_and_unmerge_is_exact(case):
    name, model, inputs = case
    delta = dh.attach(model, specs(name))
    hooked = logits(model, inputs)
    state = snapshot(model)
    delta.merge()
    torch.testing.assert_close(logits(model, inputs), hooked, rtol=1e-4, atol=1e-4)
    delta.unmerge()
    assert_restored(model, state, same_hook_ids=False)
    assert_outputs_equal(logits(model, inputs), hooked)


@pytest.mark.parametrize("first_out_first", [True, False])
def test_two_deltas_detach_in_either_order(case, first_out_first):
    name, model, inputs = case
    before = snapshot(model)
    base = logits(model, inputs)
    a = dh.attach(model, specs(name), name="a")
    b = dh.attach(model, dh.LoRA(targets="all-linear", r=2, init="random"), name="b")
    train_step(model, inputs)
    first, second = (a, b) if first_out_first else (b, a)
    first.detach()
    second.detach()
    assert_restored(model, before)
    assert_outputs_equal(logits(model, inputs), base)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "vit"])  # ViT has no token ids
def test_lora_on_token_embeddings(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    embeddings = model.get_input_embeddings()
    path = next(p for p, m in model.named_modules() if m is embeddings)
    delta = dh.attach(model, dh.LoRA(targets=dh.Paths([path]), r=2, init="random"))
    hooked = logits(model, inputs)
    if model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is embeddings.weight
    ):
        before = snapshot(model)
        with pytest.raises(dh.DeltaStateError, match="tied"):
            delta.merge()  # it would change the output head too
        assert_restored(model, before)
        return
    delta.merge()
    torch.testing.assert_close(logits(model, inputs), hooked, rtol=1e-4, atol=1e-4)
