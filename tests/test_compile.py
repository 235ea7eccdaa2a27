"""torch.compile sees hooked deltas as one graph, and flipping a delta's flag stays correct."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import deltahooks as dh

transformers = pytest.importorskip("transformers")


def tiny_llama():
    from tiny_models import llama

    torch.manual_seed(0)
    model, inputs = llama()
    return model.eval(), inputs["input_ids"]


def test_no_graph_breaks_and_compiled_matches_eager():
    model, ids = tiny_llama()
    delta = dh.attach(
        model, [dh.LoRA(targets="all-linear", r=4, init="random"), dh.Full(targets=["lm_head"])]
    )
    explained = dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, eager)
        with delta.disabled():
            base = model(ids).logits
            torch.testing.assert_close(compiled(ids).logits, base)
        assert not torch.allclose(base, eager)
        torch.testing.assert_close(compiled(ids).logits, eager)
    model.train()
    compiled(ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    dynamo.reset()
