"""ParallelAdapter: a bottleneck that reads a module's input and adds to its output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_bar import check_refused
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge refused, checkpointing, compile) runs for
# ParallelAdapter's rows in tests/method_table.py

ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("activation", list(ACTS))
def test_output_matches_the_formula_on_a_linear_of_another_width(activation):
    model, x = make_model(), torch.randn(4, 6)
    delta = dh.attach(
        model,
        dh.ParallelAdapter(
            targets=["0"], bottleneck=3, scale=0.5, activation=activation, init="random"
        ),
    )
    down, down_bias, up, up_bias = delta.state_dict().values()
    assert down.shape == (3, 6) and up.shape == (8, 3)  # reads 6 wide, writes 8 wide
    with torch.no_grad():
        with delta.disabled():
            y = model[0](x)
        want = y + 0.5 * (ACTS[activation](x @ down.T + down_bias) @ up.T + up_bias)
        torch.testing.assert_close(model[0](x), want)


def test_a_bert_output_block_reads_its_intermediate_input():
    torch.manual_seed(0)
    model, _ = MODELS["bert"]()
    delta = dh.attach(
        model.eval(), dh.ParallelAdapter(targets=["output"], bottleneck=4, init="random")
    )
    block = model.bert.encoder.layer[0].output
    state = delta.state_dict()
    down = state["bert.encoder.layer.0.output.parallel_down"]
    assert down.shape == (4, 48)  # intermediate_size, not config.hidden_size
    assert state["bert.encoder.layer.0.attention.output.parallel_down"].shape == (4, 32)
    inner, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 32)
    prefix = "bert.encoder.layer.0.output.parallel_"
    with torch.no_grad():
        with delta.disabled():
            base = block(inner, residual)
        hidden = F.relu(inner @ down.T + state[prefix + "down_bias"])
        want = base + hidden @ state[prefix + "up"].T + state[prefix + "up_bias"]
        torch.testing.assert_close(block(inner, residual), want)


def test_tuple_outputs_change_their_first_element_only():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    model, x = nn.Sequential(Pair()), torch.randn(3, 4)
    delta = dh.attach(model, dh.ParallelAdapter(targets=["0"], bottleneck=2, hidden_size=4))
    first, second = model(x)
    assert torch.equal(first, x * 2) and second is x  # identity at init
    torch.nn.init.normal_(model[0].dh__default__parallel_up)
    down, down_bias, up, up_bias = delta.state_dict().values()
    first, second = model(x)
    torch.testing.assert_close(first, x * 2 + F.relu(x @ down.T + down_bias) @ up.T + up_bias)
    assert second is x


def test_bad_inputs_are_refused_with_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="bottleneck=0 must be a positive integer"):
        dh.ParallelAdapter(targets=["0"], bottleneck=0)
    with pytest.raises(dh.SpecError, match="activation='swish' is unknown"):
        dh.ParallelAdapter(targets=["0"], activation="swish")
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.Conv1d(8, 8, 1))
    check_refused(
        model,
        dh.ParallelAdapter(targets=["1"], bottleneck=7),
        dh.SpecError,
        r"bottleneck=7 is larger than the input width 6 of '1'.*bottleneck <= 6",
    )
    check_refused(
        model,
        dh.ParallelAdapter(targets=["0"], bottleneck=2),
        dh.UnsupportedModuleError,
        r"'0' \(Embedding\) works on token ids",
    )
    check_refused(
        model,
        dh.ParallelAdapter(targets=["2"], bottleneck=2),
        dh.UnsupportedModuleError,
        r"'2' \(Conv1d\) works on channels first",
    )
    check_refused(
        model,
        dh.ParallelAdapter(targets=["1"], bottleneck=2, hidden_size=6),
        dh.SpecError,
        "output is 8 wide",
    )


def test_a_module_without_a_known_input_width_is_refused_by_name():
    class Gate(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    model = nn.Sequential(Gate())
    check_refused(
        model,
        dh.ParallelAdapter(targets=["0"], bottleneck=2),
        dh.SpecError,
        r"input width of '0' \(Gate\).*pass hidden_size=",
    )


def test_an_input_of_another_width_than_planned_says_what_to_do():
    class Mixer(nn.Module):  # its first Linear does not read the module's input
        def __init__(self):
            super().__init__()
            self.side = nn.Linear(3, 4)
            self.main = nn.Linear(4, 4)

        def forward(self, x):
            return self.main(x)

    model = nn.Sequential(Mixer())
    dh.attach(model, dh.ParallelAdapter(targets=["0"], bottleneck=2))
    with pytest.raises(
        dh.UnsupportedModuleError,
        match=r"input, which has shape \(2, 4\), but it was planned for \(\.\.\., 3\)",
    ):
        model(torch.randn(2, 4))
