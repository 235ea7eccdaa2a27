"""Hypothesis strategies: random module trees (blueprints built into real modules).

A blueprint is plain data, so hypothesis can shrink it; :func:`build` turns it into
an ``nn.Module`` that maps ``(batch, features)`` to ``(batch, features')`` using
Linear, Conv1d, Conv2d and Embedding leaves inside Sequential, ModuleList, ModuleDict
and custom containers.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


class ConvOverFeatures1d(nn.Module):
    """Treats the feature axis as a 1-channel signal; keeps the width."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, kernel, padding=kernel // 2)

    def forward(self, x):
        width = x.shape[-1]
        return self.conv(x.unsqueeze(1))[..., :width].mean(1)


class ConvOverFeatures2d(nn.Module):
    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, (kernel, 1), padding=(kernel // 2, 0))

    def forward(self, x):
        width = x.shape[-1]
        return self.conv(x.unsqueeze(1).unsqueeze(-1))[:, :, :width, 0].mean(1)


class EmbeddingMix(nn.Module):
    """Adds token embeddings looked up from a fixed id buffer (a persistent buffer)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num, dim)
        self.register_buffer("ids", torch.arange(3) % num)

    def forward(self, x):
        return x + self.embed(self.ids).mean(0)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class ListStack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class DictStack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({f"b{i}": layer for i, layer in enumerate(layers)})

    def forward(self, x):
        for layer in self.blocks.values():
            x = layer(x)
        return x


leaf = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 6)),
    st.tuples(st.just("conv1d"), st.integers(1, 3), st.sampled_from([1, 3])),
    st.tuples(st.just("conv2d"), st.integers(1, 3), st.sampled_from([1, 3])),
    st.tuples(st.just("embed"), st.integers(2, 5)),
)

blueprint = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.tuples(
            st.sampled_from(["seq", "list", "dict"]), st.lists(inner, min_size=1, max_size=3)
        ),
        st.tuples(st.just("residual"), inner),
    ),
    max_leaves=6,
)


def _build(bp, dim: int) -> tuple[nn.Module, int]:
    kind = bp[0]
    if kind == "linear":
        return nn.Linear(dim, bp[1]), bp[1]
    if kind == "conv1d":
        return ConvOverFeatures1d(bp[1], bp[2]), dim
    if kind == "conv2d":
        return ConvOverFeatures2d(bp[1], bp[2]), dim
    if kind == "embed":
        return EmbeddingMix(bp[1], dim), dim
    if kind == "residual":
        body, _ = _build(("seq", [bp[1], ("linear", dim)]), dim)
        return Residual(body), dim
    layers = []
    for child in bp[1]:
        layer, dim = _build(child, dim)
        layers.append(layer)
    container = {"seq": nn.Sequential, "list": ListStack, "dict": DictStack}[kind]
    return container(*layers) if kind == "seq" else container(layers), dim


def build(bp, in_dim: int, dtype: torch.dtype, seed: int) -> nn.Module:
    """The module a blueprint describes, with weights from ``seed``, in ``dtype``."""
    torch.manual_seed(seed)
    model, _ = _build(("seq", [bp]), in_dim)
    return model.to(dtype)


def adaptable_paths(model: nn.Module) -> list[str]:
    """Paths of the leaves LoRA supports."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    return [p for p, m in model.named_modules() if isinstance(m, kinds)]


@st.composite
def models(draw):
    """(model, example input, blueprint) with random structure, shapes and dtype."""
    bp = draw(blueprint)
    dtype = draw(st.sampled_from(DTYPES))
    in_dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    model = build(bp, in_dim, dtype, seed)
    x = torch.randn(2, in_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return model, x, (bp, in_dim, dtype, seed)


@st.composite
def lora_specs(draw, model: nn.Module, init: str = "random"):
    """A LoRA spec over a random non-empty subset of the model's adaptable leaves."""
    from deltahooks import LoRA, Paths

    paths = adaptable_paths(model)
    chosen = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=len(paths), unique=True))
    if draw(st.booleans()):
        targets = Paths(chosen)
    else:
        targets = ["re:" + "|".join(p.replace(".", r"\.") for p in chosen)]
    return LoRA(
        targets=targets,
        r=draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from([1.0, 2.0, 8.0])),
        rslora=draw(st.booleans()),
        init=init,
    ), chosen
