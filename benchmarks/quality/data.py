"""The task every row trains on: MiniLM-L6 with a new 2-way head, VADER word polarity
(``deltahooks.demo``), one fixed 80/20 train/test split whatever the seed.

Why fixed: a seed changes the head's initialisation, the delta's initialisation, dropout
and the batch order, never the split, so the spread over seeds is the training's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltahooks import demo

SPLIT_SEED = 0  # the demo's default split; fixed across seeds so only training varies


@dataclass
class Task:
    """The model to train (seeded) and the encoded words; what the table reports of them."""

    model: nn.Module
    train_set: demo.Split
    test_set: demo.Split
    base_params: int  # the model's parameters, new head included
    majority: float  # share of the test set's larger class

    @property
    def sizes(self) -> dict[str, int]:
        return {"train_size": len(self.train_set), "test_size": len(self.test_set)}


def load_task(seed: int) -> Task:
    """MiniLM-L6 seeded with ``seed`` (head init, then the delta's), the fixed split encoded."""
    model, tokenizer = demo.load_model(seed)
    train_words, test_words = demo.load_words(SPLIT_SEED)
    train_set, test_set = demo.encode(tokenizer, train_words), demo.encode(tokenizer, test_words)
    positive = test_set.labels.float().mean().item()
    base_params = sum(p.numel() for p in model.parameters())
    return Task(model, train_set, test_set, base_params, max(positive, 1 - positive))
