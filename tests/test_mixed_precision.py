"""bfloat16 autocast, and float32 delta weights on a bfloat16 model (``dtype=`` / ``delta.to``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deltahooks as dh

pytest.importorskip("transformers")

from tiny_models import llama

SPECS = {
    "lora": lambda: dh.LoRA(targets="all-linear", r=4, init="random"),
    "dora": lambda: dh.LoRA(targets=["q_proj", "down_proj"], r=2, dora=True),
    "ia3": lambda: dh.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]),
    "adapter": lambda: dh.Adapter(targets=["mlp"], bottleneck=4),
    "lntuning": lambda: dh.LNTuning(),
    "loha": lambda: dh.LoHa(targets=["q_proj"], r=2),
    "oft": lambda: dh.OFT(targets=["v_proj"]),
    "vera": lambda: dh.VeRA(targets=["q_proj"], r=8),
    "prefix": lambda: dh.PrefixTuning(num_tokens=2, hidden=8),
    "prompt": lambda: dh.PromptTuning(num_tokens=2),
}


def build(dtype=torch.float32):
    torch.manual_seed(0)
    model, inputs = llama()
    return model.to(dtype), inputs


@pytest.mark.parametrize("name", list(SPECS))
def test_every_method_trains_under_bfloat16_autocast(name):
    model, inputs = build()
    delta = dh.attach(model, SPECS[name]())
    with torch.no_grad():
        full = model(**inputs).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad for p in delta.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**inputs).logits.float()
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["lora", "ia3", "lntuning", "oft"])
def test_float32_delta_on_a_bfloat16_model_trains_saves_and_loads(name, tmp_path):
    model, inputs = build(torch.bfloat16)
    delta = dh.attach(model, dataclasses.replace(SPECS[name](), dtype="float32"))
    assert all(t.dtype == torch.float32 for t in delta.state_dict().values())
    assert {p.dtype for n, p in model.named_parameters() if "dh__" not in n} == {torch.bfloat16}
    optimizer = torch.optim.Adam(delta.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in delta.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    delta.save(tmp_path / "d.safetensors")
    fresh, _ = build(torch.bfloat16)
    loaded = dh.load(fresh, tmp_path / "d.safetensors")
    assert loaded.specs[0].dtype == "float32"
    for key, value in delta.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_delta_to_float32_equals_the_dtype_option():
    (one, inputs), (two, _) = build(torch.bfloat16), build(torch.bfloat16)
    by_option = dh.attach(one, dh.LoRA(targets=["q_proj"], init="random", dtype="float32"))
    torch.manual_seed(0)
    by_to = dh.attach(two, dh.LoRA(targets=["q_proj"], init="random")).to(torch.float32)
    params = list(by_to.parameters())
    assert [p.dtype for p in params] == [torch.float32] * len(params)
    with torch.no_grad():
        got = two(**inputs).logits
    assert got.dtype == torch.bfloat16
    by_to.to(torch.bfloat16)  # and back: the same Parameter objects
    assert list(by_to.parameters()) == params and params[0].dtype == torch.bfloat16
    assert by_option.specs[0].dtype == "float32"


def test_a_bad_dtype_is_refused():
    with pytest.raises(dh.SpecError, match="dtype='fp8' is unknown"):
        dh.LoRA(targets=["q_proj"], dtype="fp8")
