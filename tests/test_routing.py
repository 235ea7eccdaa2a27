"""dh.route: one batch, each row through its own delta(s), equal to running each row alone."""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_restored, snapshot

import deltahooks as dh

pytest.importorskip("transformers")

from tiny_models import gpt2, llama, t5

ATOL = 1e-6
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "t5": ["q", "v", "wo"],
}


def model_with_deltas(kind: str, specs: dict | None = None):
    """A tiny model (eval, fp32) with deltas ``a`` and ``b`` (random LoRAs by default)."""
    torch.manual_seed(0)
    model, _ = {"llama": llama, "gpt2": gpt2, "t5": t5}[kind]()
    model.eval()
    targets = TARGETS[kind]
    specs = specs or {
        "a": dh.LoRA(targets=targets, r=2, init="random"),
        "b": dh.LoRA(targets=targets, r=3, alpha=6, init="random"),
    }
    for name, spec in specs.items():
        dh.attach(model, spec, name=name)
    return model


def ids(rows: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 97, (rows, length), generator=torch.Generator().manual_seed(1))


def alone(model, names, x) -> torch.Tensor:
    """Logits of ``x`` run by itself with only ``names`` active."""
    dh.set_active(model, names)
    with torch.no_grad():
        return model(input_ids=x).logits


def as_names(entry) -> list[str]:
    return [] if entry is None else [entry] if isinstance(entry, str) else list(entry)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_row_equals_that_row_run_alone_with_its_delta(kind):
    model = model_with_deltas(kind)
    rows = ["a", "b", None, "a", ["a", "b"]]
    x = ids(len(rows))
    with torch.no_grad(), dh.route(model, rows):
        routed = model(input_ids=x).logits
    for i, entry in enumerate(rows):
        torch.testing.assert_close(
            routed[i], alone(model, as_names(entry), x[i : i + 1])[0], rtol=0, atol=ATOL
        )
    # the rows differ from each other: every delta really acted on its own rows only
    assert not torch.allclose(routed[0], alone(model, ["b"], x[:1])[0], atol=1e-4)
    assert not torch.allclose(routed[2], alone(model, ["a"], x[2:3])[0], atol=1e-4)


@pytest.mark.parametrize(
    "specs",
    [
        {"a": dh.LoRA(targets=["q_proj"], r=2, dora=True, init="random")},
        {"a": dh.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])},
        {"a": dh.Adapter(targets=["mlp"], bottleneck=4)},
        {"a": dh.VeRA(targets=["q_proj", "v_proj"], r=4)},
        {"a": dh.ReFT(targets=["layers.0"], positions="f1+l1", rank=2)},
        {"a": dh.OFT(targets=["q_proj"], block_size=4)},
    ],
    ids=["dora", "ia3", "adapter", "vera", "reft", "oft"],
)
def test_output_and_input_site_methods_route(specs):
    model = model_with_deltas("llama", specs)
    with torch.no_grad():  # make every method change the outputs
        for parameter in dh.deltas(model)["a"].parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    rows = [None, "a", None]
    x = ids(3)
    with torch.no_grad(), dh.route(model, rows):
        routed = model(input_ids=x).logits
    for i, entry in enumerate(rows):
        expected = alone(model, as_names(entry), x[i : i + 1])[0]
        torch.testing.assert_close(routed[i], expected, rtol=0, atol=ATOL)
    assert not torch.allclose(routed[1], alone(model, [], x[1:2])[0], atol=1e-4)


def test_enabled_states_come_back_and_later_calls_are_unrouted():
    model = model_with_deltas("llama")
    dh.deltas(model)["b"].disable()
    x = ids(2)
    with torch.no_grad():
        before = model(input_ids=x).logits
    with torch.no_grad(), dh.route(model, ["b", None]):
        model(input_ids=x)
    a, b = dh.deltas(model)["a"], dh.deltas(model)["b"]
    assert (a.enabled, b.enabled) == (True, False)
    assert a._switch.rows is None and b._switch.rows is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)


def test_states_come_back_when_the_block_raises():
    model = model_with_deltas("llama")
    with pytest.raises(KeyError), dh.route(model, ["b"]):
        raise KeyError("inside")
    assert [d.enabled for d in dh.deltas(model).values()] == [True, True]
    assert all(d._switch.rows is None for d in dh.deltas(model).values())


def test_gradients_reach_each_delta_from_its_own_rows_only():
    model = model_with_deltas("llama")
    a, b = dh.deltas(model)["a"], dh.deltas(model)["b"]
    with dh.route(model, ["a", "b"]):
        logits = model(input_ids=ids(2)).logits
    logits[0].sum().backward()  # row 0 went through a only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    assert all(p.grad is None or not p.grad.any() for p in b.parameters())


def generate(model, x, **options):
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        decoder_start_token_id=0,  # T5's; decoder-only models ignore it
        output_scores=True,
        return_dict_in_generate=True,
        **options,
    )
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 2, "num_return_sequences": 2}],
    ids=["greedy", "beam-search"],
)
def test_generate_keeps_each_row_on_its_delta(kind, options):
    model = model_with_deltas(kind)
    rows = ["a", None, "b"]
    x = ids(3, length=5)
    with torch.no_grad(), dh.route(model, rows):
        sequences, scores = generate(model, x, **options)
    per = options.get("num_return_sequences", 1)
    for i, entry in enumerate(rows):
        dh.set_active(model, as_names(entry))
        with torch.no_grad():
            own_sequences, own_scores = generate(model, x[i : i + 1], **options)
        torch.testing.assert_close(sequences[i * per : (i + 1) * per], own_sequences)
        beams = options.get("num_beams", 1)
        torch.testing.assert_close(
            scores[i * beams : (i + 1) * beams], own_scores, rtol=0, atol=1e-5
        )


def test_a_compiled_model_routes_like_the_eager_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    for name in ("a", "b"):
        dh.attach(model.eval(), dh.LoRA(targets=torch.nn.Linear, r=2, init="random"), name=name)
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for rows in (["a", "b", None], ["b", None, "a"], ["a", "a", "a"]):
            with dh.route(model, rows):
                torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- refusals
def assert_refused(model, rows, error, match):
    before = snapshot(model)
    states = {name: d.enabled for name, d in dh.deltas(model).items()}
    with pytest.raises(error, match=match), dh.route(model, rows):
        pass
    assert_restored(model, before)
    assert {name: d.enabled for name, d in dh.deltas(model).items()} == states
    assert all(d._switch.rows is None for d in dh.deltas(model).values())


@pytest.mark.parametrize(
    "spec, method",
    [
        (dh.LoHa(targets=["q_proj"], r=2), "loha"),
        (dh.LNTuning(targets=["input_layernorm"]), "ln_tuning"),
        (dh.Full(targets=["lm_head"]), "full"),
        (dh.LoRA(targets=["q_proj"], r=2, init="pissa"), "lora"),
        (dh.PromptTuning(num_tokens=2), "prompt_tuning"),
    ],
    ids=["weight-site", "ln-tuning", "full", "pissa", "prompt"],
)
def test_deltas_that_act_on_the_whole_batch_are_refused(spec, method):
    model = model_with_deltas("llama")
    dh.attach(model, spec, name="whole")
    assert_refused(model, ["a", "whole"], dh.UnsupportedOperationError, rf"{method}.*set_active")
    # attached but not routed, it is simply off for every row
    with torch.no_grad(), dh.route(model, ["a", None]):
        routed = model(input_ids=ids(2)).logits
    torch.testing.assert_close(routed[1], alone(model, [], ids(2)[1:2])[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([], dh.SpecError, "one entry per row"),
        ("a", dh.SpecError, "one entry per row"),
        (["a", 3], dh.SpecError, "row 1 is 3"),
        (["a", ["b", "b"]], dh.SpecError, "names a delta twice"),
        (["a", "c"], dh.DeltaStateError, r"no delta named \['c'\].*attached: \['a', 'b'\]"),
    ],
)
def test_bad_rows_are_refused_with_the_model_unchanged(rows, error, match):
    assert_refused(model_with_deltas("llama"), rows, error, match)


def test_merged_deltas_and_nested_routes_are_refused():
    model = model_with_deltas("llama")
    dh.deltas(model)["b"].merge()
    assert_refused(model, ["a", None], dh.DeltaStateError, r"\['b'\] are merged.*unmerge")
    dh.deltas(model)["b"].unmerge()
    with dh.route(model, ["a", "b"]):
        with pytest.raises(dh.DeltaStateError, match="already routing"), dh.route(model, ["a"]):
            pass


def test_a_batch_that_does_not_fit_the_rows_is_an_error():
    model = model_with_deltas("llama")
    with torch.no_grad(), dh.route(model, ["a", "b"]):
        with pytest.raises(dh.DeltaStateError, match=r"given 2 rows.*batch of 3"):
            model(input_ids=ids(3))
    assert [d.enabled for d in dh.deltas(model).values()] == [True, True]
