"""transformers.Trainer on a model with a delta; DeltaTrainer checkpoints hold the delta only."""

from __future__ import annotations

import os

import pytest
import torch

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from tiny_models import llama  # noqa: E402

from deltahooks.integrations import CHECKPOINT_NAME, DeltaTrainer  # noqa: E402


def dataset(length=6):
    """Four sequences, four times over: every batch is worth learning from."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (4, length), generator=generator).repeat(4, 1)
    return [{"input_ids": row, "labels": row} for row in ids]


def setup(tmp_path, trainer_class, **overrides):
    torch.manual_seed(0)
    model, _ = llama()
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2))
    options = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    args = transformers.TrainingArguments(**options)
    return model, delta, trainer_class(model=model, args=args, train_dataset=dataset())


def test_the_stock_trainer_trains_only_the_delta(tmp_path):
    model, delta, trainer = setup(tmp_path, transformers.Trainer, save_strategy="no")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dh__" not in n}
    before = {k: v.clone() for k, v in delta.state_dict().items()}
    trainer.train()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert any(not torch.equal(v, before[k]) for k, v in delta.state_dict().items())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_checkpoints_hold_the_delta_only_and_resume_to_the_same_weights(tmp_path):
    _, delta, trainer = setup(tmp_path / "straight", DeltaTrainer)
    trainer.train()
    want = delta.state_dict()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = sorted(os.listdir(checkpoint))
    assert CHECKPOINT_NAME in files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    # a second run stops at step 2's checkpoint and resumes from it
    _, resumed, trainer = setup(tmp_path / "straight", DeltaTrainer)
    assert not torch.equal(
        resumed.state_dict()["model.layers.0.self_attn.q_proj.lora_A"],
        want["model.layers.0.self_attn.q_proj.lora_A"],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for key, tensor in want.items():
        torch.testing.assert_close(resumed.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)


def test_resuming_into_a_model_with_other_deltas_names_the_mismatch(tmp_path):
    _, _, trainer = setup(tmp_path, DeltaTrainer, max_steps=2)
    trainer.train()
    model, _ = llama()
    dh.attach(model, dh.LoRA(targets=["q_proj"], r=2), name="other")
    from deltahooks.integrations import load_checkpoint

    with pytest.raises(dh.DeltaFileError, match=r"holds deltas \['default'\].*\['other'\]"):
        load_checkpoint(model, str(tmp_path / "checkpoint-2"))
