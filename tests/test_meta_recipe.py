"""The large-model recipe: build on ``meta``, attach, materialise, load the base, initialise."""

from __future__ import annotations

import pytest
import torch

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from tiny_models import llama  # noqa: E402

SPECS = [
    dh.LoRA(targets=["q_proj", "v_proj"], r=2),
    dh.IA3(targets=["k_proj"]),
    dh.LoRA(targets=["o_proj"], r=2, init="pissa"),
]


@pytest.mark.parametrize("spec", SPECS, ids=["lora", "ia3", "pissa"])
def test_a_delta_attached_on_meta_trains_after_materialising(spec):
    torch.manual_seed(0)
    reference, inputs = llama()
    reference.eval()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(reference.config)
    delta = dh.attach(model, spec)  # costs no memory: everything is on meta
    assert all(t.is_meta for t in delta.state_dict().values())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict(), strict=True)  # the base checkpoint
    for name, buffer in reference.named_buffers():  # non-persistent tables (rotary)
        model.get_buffer(name).copy_(buffer)
    delta.reset_parameters()
    model.eval()
    with torch.no_grad():  # each of these starts as the identity
        torch.testing.assert_close(
            model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5
        )
    optimizer = torch.optim.Adam(delta.parameters(), lr=0.02)
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
