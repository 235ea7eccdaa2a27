"""``torch.func`` over a model with deltas: ``grad`` of a ``functional_call`` gives what
``backward`` gives, for every method (our custom autograd functions included)."""

from __future__ import annotations

import pytest
import torch

import deltahooks as dh

pytest.importorskip("transformers")
from tiny_models import llama  # after the importorskip

SPECS = {
    "lora": lambda: dh.LoRA(targets=["q_proj", "v_proj"], r=2, init="random"),
    "lora-dropout": lambda: dh.LoRA(targets=["q_proj", "down_proj"], r=2, dropout=0.2),
    "dora": lambda: dh.LoRA(targets=["q_proj"], r=2, dora=True),
    "lora-parameter": lambda: dh.LoRA(targets=["q_proj.weight"], r=2, init="random"),
    "full": lambda: dh.Full(targets=["q_proj"]),
    "adapter": lambda: dh.Adapter(targets=["mlp"], bottleneck=8),
    "ln-tuning": lambda: dh.LNTuning(),
    "ia3": lambda: dh.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]),
    "loha": lambda: dh.LoHa(targets=["q_proj"], r=2),
    "lokr": lambda: dh.LoKr(targets=["q_proj"], r=2),
    "vera": lambda: dh.VeRA(targets=["q_proj"], r=8),
    "adalora": lambda: dh.AdaLoRA(targets=["q_proj"], init_r=4, target_r=2, total_step=10),
    "oft": lambda: dh.OFT(targets=["q_proj"]),
    "boft": lambda: dh.BOFT(targets=["q_proj"]),
    "compacter": lambda: dh.Compacter(targets=["mlp"]),
    "reft": lambda: dh.ReFT(targets=["layers.0"]),
    "prompt-tuning": lambda: dh.PromptTuning(num_tokens=3),
    "prefix-tuning": lambda: dh.PrefixTuning(num_tokens=3),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_torch_func_grad_equals_backward(name):
    torch.manual_seed(0)
    model, inputs = llama()
    delta = dh.attach(model, SPECS[name]())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from identity starts, so every gradient is non-zero
        for tensor in delta.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        torch.manual_seed(5)  # the same dropout masks in both runs
        return torch.func.functional_call(model, p, (), inputs).logits.float().pow(2).mean()

    grads = torch.func.grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves).backward()
    trained = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trained and all(leaves[k].grad.abs().sum() > 0 for k in trained)
    for key, leaf in leaves.items():  # torch.func gives zeros where backward gives None
        expected = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        torch.testing.assert_close(grads[key], expected, rtol=1e-5, atol=1e-7)
