"""dh.load(..., into=delta): new values for an attached delta, in place, no recompile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import deltahooks as dh

pytest.importorskip("transformers")

from tiny_models import llama


def spec(r=2):
    return dh.LoRA(targets=["q_proj", "v_proj"], r=r, init="random")


def saved_variant(tmp_path, seed, r=2):
    """A file from the same model and spec with other values."""
    torch.manual_seed(0)
    model, _ = llama()
    torch.manual_seed(seed)
    delta = dh.attach(model.eval(), spec(r))
    path = tmp_path / f"variant-{seed}-{r}.safetensors"
    delta.save(path)
    return path, model


def test_a_swapped_delta_computes_the_file_and_the_compiled_graph_is_reused(tmp_path):
    torch.manual_seed(0)
    model, inputs = llama()
    model.eval()
    delta = dh.attach(model, spec())
    ids = inputs["input_ids"]
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=0)
        for seed in (1, 2):
            path, source = saved_variant(tmp_path, seed)
            tensors = [t for t in delta.parameters()]
            assert dh.load(model, path, into=delta) is delta
            assert [t for t in delta.parameters()] == tensors  # the same objects, new values
            want = source(ids).logits
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
            torch.testing.assert_close(compiled(ids).logits, want, rtol=0, atol=0)
    assert counter.frame_count == 1
    dynamo.reset()


def test_a_file_that_does_not_fit_or_a_merged_delta_is_refused_unchanged(tmp_path):
    torch.manual_seed(0)
    model, _ = llama()
    model.eval()
    delta = dh.attach(model, spec())
    before = {k: v.clone() for k, v in delta.state_dict().items()}
    wider, _ = saved_variant(tmp_path, 1, r=4)
    with pytest.raises(dh.DeltaFileError, match="shape"):
        dh.load(model, wider, into=delta)
    same, _ = saved_variant(tmp_path, 1)
    delta.merge()
    with pytest.raises(dh.DeltaStateError, match="unmerge"):
        dh.load(model, same, into=delta)
    delta.unmerge()
    other, _ = llama()
    stranger = dh.attach(other, spec())
    with pytest.raises(dh.DeltaStateError, match="not attached"):
        dh.load(model, same, into=stranger)
    for key, value in delta.state_dict().items():
        assert torch.equal(value, before[key]), key
