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


@pytest.mark.parametrize("training", [False, True])
def test_switching_deltas_on_and_off_reuses_the_compiled_graph(training):
    """Hooks and parametrizations select with a gate tensor under compile: one graph for
    every on/off state (and for dh.set_active), outputs equal to eager in each; an
    inactive delta gets zero gradients there (eager: none)."""
    from torch._dynamo.testing import CompileCounter

    model, ids = tiny_llama()
    specs = {
        "lora": dh.LoRA(targets="all-linear", r=4, init="random"),
        "ia3": dh.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"], init="random"),
        "ln": dh.LNTuning(),
    }
    deltas = {name: dh.attach(model, spec, name=name) for name, spec in specs.items()}
    with torch.no_grad():
        for delta in deltas.values():
            for tensor in delta.parameters():
                tensor.add_(0.1)
    model.train(training)
    states = [["lora", "ia3", "ln"], ["lora"], [], ["ia3", "ln"], ["lora", "ia3", "ln"]]
    wanted = []
    for names in states:
        dh.set_active(model, names)
        wanted.append(model(ids).logits)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for names, want in zip(states, wanted):
        dh.set_active(model, names)
        got = compiled(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if training:
            got.pow(2).mean().backward()
            for name, delta in deltas.items():  # inactive: zero gradients (the gate's)
                grads = [t.grad for t in delta.parameters()]
                assert all(g is not None for g in grads)
                assert all(g.abs().sum() > 0 for g in grads) == (name in names), name
                delta.zero_grad(set_to_none=True)
    assert counter.frame_count == 1
    dynamo.reset()


def test_set_active_names_what_it_cannot_do_and_changes_nothing():
    model, _ = tiny_llama()
    a = dh.attach(model, dh.LoRA(targets=["q_proj"]), name="a")
    b = dh.attach(model, dh.LoRA(targets=["v_proj"]), name="b")
    with pytest.raises(dh.DeltaStateError, match=r"no delta named \['c'\].*\['a', 'b'\]"):
        dh.set_active(model, ["a", "c"])
    a.merge()
    with pytest.raises(dh.DeltaStateError, match=r"\['a'\] are merged"):
        dh.set_active(model, "b")
    assert a.enabled and b.enabled
