"""trl's SFTTrainer on a model with a delta; mixed with DeltaTrainer, delta-only checkpoints."""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

import deltahooks as dh

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from tiny_models import llama  # noqa: E402  (after the importorskip)

from deltahooks.integrations import CHECKPOINT_NAME  # noqa: E402

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
WORDS = [f"w{i}" for i in range(90)]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 ... w89`` (ids 3-92), built in memory."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def text_dataset() -> datasets.Dataset:
    """Four sentences of eight words, four times over: every batch is worth learning from."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(WORDS), (4, 8), generator=generator).repeat(4, 1)
    return datasets.Dataset.from_dict({"text": [" ".join(WORDS[i] for i in r) for r in rows]})


def config(tmp_path, **overrides) -> trl.SFTConfig:
    options = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=16,
    )
    options.update(overrides)
    return trl.SFTConfig(**options)


def llama_with_lora():
    torch.manual_seed(0)
    model, _ = llama()
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2))
    return model, delta


def test_sft_trainer_trains_only_the_delta(tmp_path):
    model, delta = llama_with_lora()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dh__" not in n}
    before = {k: v.clone() for k, v in delta.state_dict().items()}
    trainer = trl.SFTTrainer(
        model=model,
        args=config(tmp_path),
        train_dataset=text_dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"base parameter {name} changed"
    changed = [k for k, v in delta.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(before), "every LoRA tensor trains"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def readme_example(monkeypatch, tmp_path, **names) -> dict:
    """Run README's trl block in ``tmp_path`` with ``names`` defined; returns its namespace."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- trl-example -->\s*```python\n(.*?)```", text, re.S)
    assert block is not None, "the README lost its trl example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example", **names}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace


def test_readme_delta_sft_trainer_writes_delta_only_checkpoints_that_resume(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model, _ = llama()
    example = readme_example(
        monkeypatch, tmp_path, model=model, dataset=text_dataset(), tokenizer=tokenizer()
    )
    delta, trainer, DeltaSFTTrainer = (
        example["delta"],
        example["trainer"],
        example["DeltaSFTTrainer"],
    )
    assert trainer.state.global_step == 4
    trained = delta.state_dict()
    for step in (2, 4):
        files = sorted(os.listdir(tmp_path / "sft" / f"checkpoint-{step}"))
        assert CHECKPOINT_NAME in files
        assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files

    # the portable file loads into a fresh model with the trained tensors
    torch.manual_seed(0)
    fresh, _ = llama()
    loaded = dh.load(fresh, tmp_path / "sft-lora.safetensors")
    assert loaded.state_dict().keys() == trained.keys()
    for key, tensor in trained.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    # a fresh model with the same delta resumes from step 2 to the uninterrupted weights
    torch.manual_seed(0)
    again, _ = llama()
    resumed_delta = dh.attach(again, dh.LoRA(targets="all-linear", r=8))
    key = "model.layers.0.self_attn.q_proj.lora_B"
    assert not torch.equal(resumed_delta.state_dict()[key], trained[key])
    resumed = DeltaSFTTrainer(
        model=again,
        args=trl.SFTConfig(
            output_dir=str(tmp_path / "resumed"), max_steps=4, save_steps=2, use_cpu=True
        ),
        train_dataset=text_dataset(),
        processing_class=tokenizer(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-2"))
    for key, tensor in trained.items():
        torch.testing.assert_close(resumed_delta.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)
