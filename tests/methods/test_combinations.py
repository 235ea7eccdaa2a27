"""Methods combine in one attach: the MAM adapter and UniPELT, on tiny GPT-2 and Llama.

MAM (He et al. 2022) = prefix tuning + a parallel adapter on the feed-forward block;
UniPELT (Mao et al. 2022, without its gates) = LoRA + prefix tuning + a sequential adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import assert_outputs_equal, assert_restored, snapshot
from tiny_models import gpt2, llama

import deltahooks as dh

FEED_FORWARD = {"gpt2": "re:.*\\.mlp", "llama": "re:.*\\.mlp"}
ATTENTION = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
COMBINATIONS = {
    "MAM": lambda name: [
        dh.PrefixTuning(num_tokens=3, reparameterize=False),
        dh.ParallelAdapter(targets=FEED_FORWARD[name], bottleneck=4, init="random"),
    ],
    "UniPELT": lambda name: [
        dh.LoRA(targets=ATTENTION[name], r=2, init="random"),
        dh.PrefixTuning(num_tokens=3, reparameterize=False),
        dh.Adapter(targets=FEED_FORWARD[name], bottleneck=4, init="random"),
    ],
}
MODELS = {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_combined_methods_train_save_load_and_detach(combination, name, tmp_path):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    pristine = copy.deepcopy(model)
    before = snapshot(model)
    base = model(**inputs).logits
    delta = dh.attach(model, COMBINATIONS[combination](name))
    assert len({method for method, *_ in delta.parts}) == len(delta.specs)

    model.train()
    optimizer = torch.optim.Adam(delta.parameters(), lr=1e-2)
    labels = inputs["input_ids"]
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "dh__" not in n)

    model.eval()
    tuned = model(**inputs).logits
    path = tmp_path / "combined.safetensors"
    delta.save(path)
    fresh = copy.deepcopy(pristine)
    dh.load(fresh, path)
    assert_outputs_equal(fresh(**inputs).logits, tuned)

    delta.detach()
    assert_restored(model, before)
    assert_outputs_equal(model(**inputs).logits, base)
