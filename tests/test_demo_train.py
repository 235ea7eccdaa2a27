"""The demo's training loop: its regulariser and after-step hooks (AdaLoRA's allocator uses them)."""

import pytest
import torch
from tiny_models import bert

import deltahooks as dh
from deltahooks import demo

pytest.importorskip("tqdm")


def tiny_data(rows: int = 40) -> demo.Split:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 97, (rows, 6), generator=generator)
    labels = torch.randint(0, 3, (rows,), generator=generator)
    return demo.Split(input_ids, torch.ones_like(input_ids), labels)


def test_after_step_sees_every_step_with_its_gradients():
    torch.manual_seed(0)
    model, _ = bert()
    data = tiny_data()
    seen = []

    def after_step(step):
        seen.append((step, model.classifier.weight.grad is not None))

    demo.train(model, data, epochs=2, lr=1e-3, seed=0, after_step=after_step)
    steps = len(demo.batches(len(data), 2, 0))
    assert seen == [(step, True) for step in range(1, steps + 1)]


def trained_head(extra_loss_of) -> torch.Tensor:
    """The classifier weight after training with ``extra_loss_of(model)`` as regulariser."""
    torch.manual_seed(0)
    model, _ = bert()
    extra = extra_loss_of(model)
    demo.train(model, tiny_data(), epochs=2, lr=1e-2, seed=0, extra_loss=extra)
    return model.classifier.weight.detach().clone()


def test_extra_loss_is_trained_on():
    plain = trained_head(lambda model: None)
    zero = trained_head(lambda model: lambda: 0.0 * model.classifier.weight.sum())
    pulled = trained_head(lambda model: lambda: 100.0 * model.classifier.weight.pow(2).sum())
    assert torch.equal(plain, zero)  # a zero term changes nothing
    assert pulled.norm() < plain.norm()  # a strong weight penalty is trained on


def test_adalora_allocator_through_train_ends_at_the_target_budget():
    torch.manual_seed(0)
    model, _ = bert()
    data = tiny_data()
    steps = len(demo.batches(len(data), 3, 0))
    spec = dh.AdaLoRA(targets=["query", "value"], init_r=4, target_r=2, total_step=steps, tfinal=1)
    delta = dh.attach(model, spec)
    allocator = dh.adalora_allocator(delta)
    demo.train(
        model,
        data,
        epochs=3,
        lr=1e-2,
        seed=0,
        extra_loss=allocator.orthogonality_loss,
        after_step=allocator.update_and_allocate,
    )
    kept = sum(sum(mask) for mask in allocator.rank_pattern.values())
    assert kept == 2 * len(allocator.rank_pattern) == 2 * 4  # 2 layers x (query, value)
    nonzero = sum(
        int(t.count_nonzero()) for k, t in delta.state_dict().items() if k.endswith("lora_E")
    )
    assert nonzero == kept
