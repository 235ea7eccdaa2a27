"""Plain torch models for the method table: each holds every layer kind one method takes.

Each builder returns ``(model, inputs)`` like those of ``tiny_models``; ``inputs`` is a dict
of keyword arguments. The methods' own tests use them too, for their formulas.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


class LoKrNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)
        self.head = nn.Linear(4, 12)

    def forward(self, pixels):
        h = torch.relu(self.grouped(torch.relu(self.conv(pixels))))
        return self.head(h.mean((2, 3)))


def lokr_net():
    return LoKrNet(), {"pixels": torch.randn(2, 3, 4, 4)}


class LoHaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 1, groups=2)
        self.seq = nn.Conv1d(4, 5, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, pixels):
        h = torch.relu(self.grouped(torch.relu(self.conv(pixels))))
        h = self.seq(h.flatten(2))
        return self.head(h.mean(2))


def loha_net():
    return LoHaNet(), {"pixels": torch.randn(2, 3, 4, 4)}


class BitFitNet(nn.Module):
    """Every kind BitFit takes, channels last and channels first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.norm = nn.BatchNorm1d(6)
        self.proj = nn.Linear(6, 5, bias=False)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.norm(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(self.ln(self.proj(h)))


def bitfit_net():
    return BitFitNet(), {"ids": torch.randint(0, 11, (2, 7))}


class IA3Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.down = nn.Conv1d(6, 4, 1)
        self.up = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.down(torch.relu(self.conv(self.embed(ids).transpose(1, 2))))
        return self.out(torch.relu(self.up(h.transpose(1, 2))))


def ia3_net():
    return IA3Net(), {"ids": torch.randint(0, 11, (2, 7))}


class BOFTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 2, padding=1, groups=2)  # filter width 4
        self.conv2 = nn.Conv2d(8, 4, (2, 2), padding=1)  # filter width 32
        self.up = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (N, 8, L)
        h = self.conv2(h[:, :, None, :]).mean((2, 3))  # (N, 4)
        return self.out(torch.relu(self.up(h)))


def boft_net():
    return BOFTNet(), {"x": torch.randn(2, 4, 7)}


class OFTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(6, 4, (3, 2), padding=1)
        self.up = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        h = torch.relu(self.conv(self.embed(ids).transpose(1, 2)))  # (N, 6, L)
        h = self.conv2(h[:, :, None, :]).mean((2, 3))  # (N, 4)
        return self.out(torch.relu(self.up(h)))


def oft_net():
    return OFTNet(), {"ids": torch.randint(0, 11, (2, 7))}


def vera_net():
    """Linear layers of different widths, so each uses its own corner of the projections."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.Linear(4, 3))
    return model, {"input": torch.randn(5, 6)}


class AdaLoRANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 5)

    def forward(self, pixels):
        return self.proj(torch.relu(self.conv(pixels)).mean(dim=(2, 3)))


def adalora_net():
    return AdaLoRANet(), {"pixels": torch.randn(2, 3, 6, 6)}


class NormNet(nn.Module):
    """One of each kind of norm: LayerNorm, RMSNorm (no bias), BatchNorm, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixels):
        h = self.gn(self.bn(self.conv(pixels))).mean((2, 3))
        return self.head(self.rms(self.ln(self.proj(h))))


def norm_net():
    return NormNet(), {"pixels": torch.randn(4, 3, 5, 5)}


class Experts(nn.Module):
    """A plain MoE layer: a 3-D stack (experts × out × in, or × in × out when
    ``is_transposed``, transformers' convention), every token through every expert."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (3, 5, 6) if transposed else (3, 6, 5)  # 3 experts, 5 → 6
        self.stack = nn.Parameter(torch.randn(shape) / 3)
        self.gate = nn.Parameter(torch.randn(3, 5) / 3)  # a 2-D router weight
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        weights = self.stack if self.is_transposed else self.stack.mT  # E × in × out
        routes = torch.softmax(x @ self.gate.t(), dim=-1)  # tokens × E
        per_expert = torch.einsum("ti,eio->teo", x, weights)
        return self.norm((routes[..., None] * per_expert).sum(1))


class ExpertsNet(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.moe = Experts(transposed)  # PEFT cannot target parameters of its root module

    def forward(self, x):
        return self.moe(x)


def experts_net(transposed: bool = False):
    return ExpertsNet(transposed), {"x": torch.randn(7, 5)}


def mlp(*widths: int, norm: bool = False):
    """Linear layers through ``widths`` (a LayerNorm after the first where ``norm``), on a
    batch of 4 rows: the residual adapters' plain model."""
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    if norm:
        layers.insert(1, nn.LayerNorm(widths[1]))
    return nn.Sequential(*layers), {"input": torch.randn(4, widths[0])}


class FullHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.dense(x))))


def full_net():
    return nn.Sequential(nn.Linear(4, 4), FullHead()), {"input": torch.randn(8, 4)}


NETS = {
    "lokr-net": lokr_net,
    "loha-net": loha_net,
    "bitfit-net": bitfit_net,
    "ia3-net": ia3_net,
    "boft-net": boft_net,
    "oft-net": oft_net,
    "vera-net": vera_net,
    "adalora-net": adalora_net,
    "norm-net": norm_net,
    "experts": experts_net,
    "mlp-6-16-3": lambda: mlp(6, 16, 3, norm=True),
    "mlp-6-8-3": lambda: mlp(6, 8, 3, norm=True),
    "mlp-6-6-6": lambda: mlp(6, 6, 6),
    "full-net": full_net,
}
