"""Bad input: one case per mistake. Each raises the documented error type, with a message
that names the problem and the fix, and leaves the model bit-identical (all-or-nothing).

File-level load errors (missing, truncated, wrong shapes, NaN, ...) are in test_io.py
and the loader fuzzing in properties/test_file_fuzz.py; this catalogue covers the rest.
"""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh


class Model(nn.Module):
    """Paths "0".."5" like a Sequential; the grouped conv and ReLU sit outside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.Embedding(10, 4))
        self.add_module("1", nn.Linear(4, 8))
        self.add_module("2", nn.LayerNorm(8))
        self.add_module("3", nn.Conv1d(8, 8, 1, groups=2))
        self.add_module("4", nn.Linear(8, 3))
        self.add_module("5", nn.ReLU())

    def forward(self, ids):
        layers = dict(self.named_children())
        return layers["4"](layers["2"](layers["1"](layers["0"](ids))))


def make_model():
    torch.manual_seed(0)
    return Model()


def attach(targets, **kwargs):
    return lambda model: dh.attach(model, dh.LoRA(targets=targets, **kwargs))


def attached(name="default", **kwargs):
    """Set up: a model with one LoRA delta attached; returns (model, delta)."""

    def setup():
        model = make_model()
        return model, dh.attach(model, dh.LoRA(targets=["1"], **kwargs), name=name)

    return setup


def detached():
    model, delta = attached()()
    delta.detach()
    return model, delta


def merged():
    model, delta = attached(init="random")()
    model.eval()
    delta.merge()
    return model, delta


def meta_model():
    with torch.device("meta"):
        model = make_model()
    dh.attach(model, dh.LoRA(targets=["1"]))
    model.load_state_dict(make_model().state_dict(), assign=True)  # base real, delta not
    return model, None


def fresh():
    return make_model(), None


# (case, setup -> (model, delta), action(model, delta), error type, message pattern)
CASES = [
    (
        "a spec class instead of a spec",
        fresh,
        lambda m, d: dh.attach(m, dh.LoRA),
        dh.SpecError,
        r"class dh.LoRA, not a spec.*dh.LoRA\(targets=",
    ),
    (
        "a spec class inside a list",
        fresh,
        lambda m, d: dh.attach(m, [dh.LoRA(targets=["1"]), dh.Full]),
        dh.SpecError,
        r"dh.Full\(targets=",
    ),
    (
        "a misspelt keyword target",
        fresh,
        lambda m, d: attach("all_linear")(m),
        dh.TargetError,
        "Did you mean 'all-linear'",
    ),
    (
        "a module object from another model",
        fresh,
        lambda m, d: attach(nn.Linear(4, 8))(m),
        dh.TargetError,
        "not a submodule",
    ),
    (
        "a bool where a rank belongs",
        fresh,
        lambda m, d: attach(["1"], r=True)(m),
        dh.SpecError,
        "positive integer",
    ),
    (
        "a string where a dropout belongs",
        fresh,
        lambda m, d: attach(["1"], dropout="0.1")(m),
        dh.SpecError,
        r"number in \[0, 1\)",
    ),
    (
        "an Adapter hidden_size that contradicts the module",
        fresh,
        lambda m, d: dh.attach(m, dh.Adapter(targets=["1"], bottleneck=2, hidden_size=16)),
        dh.SpecError,
        "output is 8 wide",
    ),
    (
        "target matches nothing",
        fresh,
        lambda m, d: attach(["lin"])(m),
        dh.TargetError,
        r"Closest module paths: \['0', '1'",
    ),
    (
        "one list entry matches nothing",
        fresh,
        lambda m, d: attach(["1", "q_proj"])(m),
        dh.TargetError,
        "q_proj",
    ),
    (
        "regex does not compile",
        fresh,
        lambda m, d: attach("re:[1")(m),
        dh.TargetError,
        "regular expression",
    ),
    (
        "regex matches nothing",
        fresh,
        lambda m, d: attach(r"re:\d\d")(m),
        dh.TargetError,
        "Fix the pattern",
    ),
    (
        "glob matches nothing",
        fresh,
        lambda m, d: attach("*.q_proj")(m),
        dh.TargetError,
        "matches no module",
    ),
    (
        "exclude removes everything",
        fresh,
        lambda m, d: attach(nn.Linear, exclude=["1", "4"])(m),
        dh.TargetError,
        "narrow exclude",
    ),
    (
        "exclude matches nothing",
        fresh,
        lambda m, d: attach(nn.Linear, exclude="zzz")(m),
        dh.TargetError,
        "exclude entry",
    ),
    (
        "target is not a module type",
        fresh,
        lambda m, d: attach(dict)(m),
        dh.TargetError,
        "nn.Module subclass",
    ),
    ("target of a strange kind", fresh, lambda m, d: attach(3.0)(m), dh.TargetError, "cannot use"),
    ("empty target string", fresh, lambda m, d: attach("")(m), dh.TargetError, "empty string"),
    (
        "unsupported module type",
        fresh,
        lambda m, d: attach(["2"])(m),
        dh.UnsupportedModuleError,
        "LayerNorm.*exclude",
    ),
    (
        "grouped convolution",
        fresh,
        lambda m, d: attach(["3"])(m),
        dh.UnsupportedModuleError,
        "groups=2",
    ),
    (
        "Full on a module without parameters",
        fresh,
        lambda m, d: dh.attach(m, dh.Full(targets=["5"])),
        dh.UnsupportedModuleError,
        "nothing to train",
    ),
    ("r = 0", fresh, lambda m, d: attach(["1"], r=0)(m), dh.SpecError, "positive integer"),
    ("r negative", fresh, lambda m, d: attach(["1"], r=-2)(m), dh.SpecError, "positive integer"),
    ("alpha < 0", fresh, lambda m, d: attach(["1"], alpha=-1.0)(m), dh.SpecError, ">= 0"),
    ("alpha NaN", fresh, lambda m, d: attach(["1"], alpha=float("nan"))(m), dh.SpecError, "finite"),
    ("dropout = 1", fresh, lambda m, d: attach(["1"], dropout=1.0)(m), dh.SpecError, r"\[0, 1\)"),
    ("dropout < 0", fresh, lambda m, d: attach(["1"], dropout=-0.5)(m), dh.SpecError, r"\[0, 1\)"),
    (
        "unknown init",
        fresh,
        lambda m, d: attach(["1"], init="orthogonal")(m),
        dh.SpecError,
        "choose one of",
    ),
    (
        "bad rank_pattern value",
        fresh,
        lambda m, d: attach(["1"], rank_pattern={"1": 0})(m),
        dh.SpecError,
        "positive integer",
    ),
    (
        "rank_pattern not a dict",
        fresh,
        lambda m, d: attach(["1"], rank_pattern=[4])(m),
        dh.SpecError,
        "must be a dict",
    ),
    (
        "adapter bottleneck larger than the hidden size",
        fresh,
        lambda m, d: dh.attach(m, dh.Adapter(targets=["1"], bottleneck=16)),
        dh.SpecError,
        r"larger than the hidden size 8.*bottleneck <= 8",
    ),
    (
        "adapter bottleneck = 0",
        fresh,
        lambda m, d: dh.attach(m, dh.Adapter(targets=["1"], bottleneck=0)),
        dh.SpecError,
        "positive integer",
    ),
    ("empty target list", fresh, lambda m, d: attach([])(m), dh.SpecError, "targets is empty"),
    (
        "spec of the wrong type",
        fresh,
        lambda m, d: dh.attach(m, {"method": "lora"}),
        dh.SpecError,
        "dh.LoRA",
    ),
    ("empty spec list", fresh, lambda m, d: dh.attach(m, []), dh.SpecError, "empty spec list"),
    (
        "invalid delta name",
        fresh,
        lambda m, d: dh.attach(m, dh.LoRA(targets=["1"]), name="my delta"),
        dh.SpecError,
        "identifier",
    ),
    (
        "overlapping parts in one delta",
        fresh,
        lambda m, d: dh.attach(m, [dh.LoRA(targets=["1"]), dh.LoRA(targets=["1"])]),
        dh.SpecError,
        "must not overlap",
    ),
    (
        "duplicate delta name",
        attached(),
        lambda m, d: attach(["4"])(m),
        dh.DeltaStateError,
        "already attached.*another name",
    ),
    (
        "detach twice",
        detached,
        lambda m, d: d.detach(),
        dh.DeltaStateError,
        "detached.*attach a new one",
    ),
    (
        "save a detached delta",
        detached,
        lambda m, d: d.save("x.safetensors"),
        dh.DeltaStateError,
        "detached",
    ),
    ("merge a detached delta", detached, lambda m, d: d.merge(), dh.DeltaStateError, "detached"),
    (
        "merge while training",
        attached(),
        lambda m, d: d.merge(),
        dh.DeltaStateError,
        r"model\.eval\(\)",
    ),
    (
        "training while merged",
        merged,
        lambda m, d: (m.train(), m(torch.tensor([[1, 2]]))),
        dh.DeltaStateError,
        r"unmerge\(\)",
    ),
    ("disable while merged", merged, lambda m, d: d.disable(), dh.DeltaStateError, r"unmerge\(\)"),
    (
        "merge a disabled delta",
        attached(),
        lambda m, d: (m.eval(), d.disable(), d.merge()),
        dh.DeltaStateError,
        r"enable\(\)",
    ),
    (
        "load_state_dict with a wrong shape",
        attached(),
        lambda m, d: d.load_state_dict(
            {"1.lora_A": torch.ones(3, 4), "1.lora_B": torch.ones(8, 8)}
        ),
        dh.DeltaFileError,
        "another rank",
    ),
    (
        "load_state_dict with missing keys",
        attached(),
        lambda m, d: d.load_state_dict({}),
        dh.DeltaFileError,
        "strict=False",
    ),
    (
        "meta-device delta asked to run",
        meta_model,
        lambda m, d: m(torch.tensor([[1, 2]])),
        dh.DeltaStateError,
        "meta device.*dh.load",
    ),
]


@pytest.mark.parametrize("case, setup, action, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(case, setup, action, error, message):
    model, delta = setup()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        action(model, delta)
    assert_restored(model, before)


def test_the_catalogue_is_large():
    assert len(CASES) >= 30
