"""accelerate's Accelerator.prepare on a model with a delta: it trains only the delta."""

from __future__ import annotations

import pytest
import torch

import deltahooks as dh

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from tiny_models import llama  # noqa: E402


def test_accelerator_prepare_trains_the_delta_and_saves_it(tmp_path):
    torch.manual_seed(0)
    model, inputs = llama()
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dh__" not in n}
    rows = inputs["input_ids"].repeat(4, 1)
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(delta.parameters(), lr=0.05)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _ in range(2):
        for batch in loader:
            loss = prepared(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    unwrapped = accelerator.unwrap_model(prepared)
    assert unwrapped is model and dh.deltas(unwrapped)["default"] is delta
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    delta.save(tmp_path / "d.safetensors")
    torch.manual_seed(0)
    fresh, _ = llama()  # the same base weights
    dh.load(fresh, tmp_path / "d.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.eval()(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0
        )
