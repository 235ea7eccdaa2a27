"""PEFT parity for weight-delta methods: PEFT's adapter saved, loaded with ``dh.load_peft``,
same outputs, and the same losses over a few identical optimizer steps on both sides."""

from __future__ import annotations

import copy

import torch
from method_bar import evaluate, loss, seeded

import deltahooks as dh


def check_peft_parity(make, config, tmp_path, *, steps: int = 5, lr: float = 0.05) -> dh.Delta:
    """``config`` with non-identity init (``init_weights=False``): outputs equal to 1e-5
    (fp32), then ``steps`` SGD steps on both from the same start: losses equal to 1e-5."""
    import peft

    base, inputs = seeded(make)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = copy.deepcopy(base)
    delta = dh.load_peft(ours, tmp_path / "adapter")
    want = evaluate(theirs, inputs)
    assert not torch.allclose(want, evaluate(base, inputs), atol=1e-3), "PEFT's delta is ~zero"
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)

    sides = {
        "ours": (ours, list(delta.parameters())),
        "peft": (theirs, [p for p in theirs.parameters() if p.requires_grad]),
    }
    assert sum(p.numel() for p in sides["ours"][1]) == sum(p.numel() for p in sides["peft"][1])
    losses: dict[str, list[float]] = {}
    for side, (model, params) in sides.items():
        optimizer = torch.optim.SGD(params, lr=lr)
        losses[side] = []
        for _ in range(steps):  # eval mode: no dropout, so both see the same computation
            optimizer.zero_grad()
            value = loss(model, inputs)
            value.backward()
            optimizer.step()
            losses[side].append(value.item())
    torch.testing.assert_close(losses["ours"], losses["peft"], rtol=0, atol=1e-5)
    assert losses["ours"][-1] < losses["ours"][0], losses
    return delta
