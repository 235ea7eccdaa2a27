"""dh.combine: weighted LoRA combinations ("cat", "svd"), equal to PEFT's add_weighted_adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import assert_restored, snapshot

import deltahooks as dh

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from tiny_models import gpt2, llama  # noqa: E402

WEIGHTS = [0.7, -0.4]


def peft_pair(kind: str, tmp_path):
    """A tiny model, the same model under PEFT with random adapters ``math`` and ``code`` (other
    ranks, alphas and partly other targets), and the adapters' directories."""
    torch.manual_seed(0)
    base, inputs = {"llama": llama, "gpt2": gpt2}[kind]()
    base.eval()
    if kind == "llama":
        targets_a, targets_b, extra = ["q_proj", "v_proj", "embed_tokens"], ["v_proj"], {}
        targets_b, wider = ["v_proj", "down_proj"], "v_proj"
    else:  # GPT-2's Conv1D stores its weight as in × out
        targets_a, targets_b, wider = ["c_attn", "wte"], ["c_attn", "c_fc"], "c_attn"
        extra = {"fan_in_fan_out": True}
    common = {"init_lora_weights": False, **extra}
    config_a = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets_a, **common)
    config_b = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=targets_b, rank_pattern={wider: 4}, **common
    )
    ours = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, config_a, adapter_name="math")
    peft_model.add_adapter("code", config_b)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    for name in ("math", "code"):
        dh.load_peft(ours, tmp_path / name, name=name)
    return peft_model, ours, inputs["input_ids"]


def peft_combined(peft_model, ids, method, rank=None):
    peft_model.add_weighted_adapter(
        ["math", "code"], WEIGHTS, "ab", combination_type=method, svd_rank=rank
    )
    peft_model.set_adapter("ab")
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method, rank", [("cat", None), ("svd", None), ("svd", 1)])
def test_outputs_equal_peft_add_weighted_adapter(tmp_path, kind, method, rank):
    peft_model, ours, ids = peft_pair(kind, tmp_path)
    expected = peft_combined(peft_model, ids, method, rank)
    combined = dh.combine(ours, ["math", "code"], WEIGHTS, name="ab", method=method, rank=rank)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert {name: d.enabled for name, d in dh.deltas(ours).items()} == {
        "math": False,
        "code": False,
        "ab": True,
    }
    ranks = {key: t.shape[0] for key, t in combined.state_dict().items() if "lora_A" in key}
    if method == "cat":  # each layer: the sum of the ranks of the sources on it
        layer = (
            "model.layers.0.self_attn.v_proj" if kind == "llama" else "transformer.h.0.attn.c_attn"
        )
        assert ranks[f"{layer}.lora_A"] == 6
    else:
        assert max(ranks.values()) == (rank or 4)


def test_cat_is_exactly_the_weighted_sum_and_full_rank_svd_equals_it():
    torch.manual_seed(0)
    model, inputs = llama()
    model.eval()
    ids = inputs["input_ids"]
    dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2, init="random"), name="a")
    spec_b = dh.LoRA(targets=["v_proj"], r=3, alpha=5, rslora=True, init="random")
    dh.attach(model, spec_b, name="b")
    with torch.no_grad():
        stacked = model(input_ids=ids).logits  # a + b, each at weight 1
        dh.combine(model, ["a", "b"], [1, 1], name="cat")
        torch.testing.assert_close(model(input_ids=ids).logits, stacked, rtol=0, atol=1e-5)
        dh.combine(model, ["a", "b"], [1, 1], name="svd", method="svd", rank=5)
        dh.set_active(model, ["svd"])
        torch.testing.assert_close(model(input_ids=ids).logits, stacked, rtol=0, atol=1e-5)


def test_a_combined_delta_is_an_ordinary_lora_delta(tmp_path):
    torch.manual_seed(0)
    model, inputs = gpt2()
    model.eval()
    ids = inputs["input_ids"]
    for name in ("a", "b"):
        dh.attach(model, dh.LoRA(targets=["c_attn"], r=2, init="random"), name=name)
    combined = dh.combine(model, ["a", "b"], [0.5, 0.5], name="ab", method="svd")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    combined.save(tmp_path / "ab.safetensors")
    combined.detach()
    dh.set_active(model, [])
    dh.load(model, tmp_path / "ab.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- refusals
def two_loras():
    torch.manual_seed(0)
    model, _ = llama()
    for name in ("a", "b"):
        dh.attach(model, dh.LoRA(targets=["q_proj"], r=2, init="random"), name=name)
    return model


@pytest.mark.parametrize(
    "args, options, error, match",
    [
        ([[], []], {}, dh.SpecError, "list of delta names"),
        (["a", [1.0]], {}, dh.SpecError, "list of delta names"),
        ([["a", "a"], [1, 1]], {}, dh.SpecError, "distinct"),
        ([["a", "b"], [1.0]], {}, dh.SpecError, "one weight per delta"),
        ([["a", "b"], [1.0, float("nan")]], {}, dh.SpecError, "weight of 'b'=nan"),
        ([["a", "c"], [1, 1]], {}, dh.DeltaStateError, r"no delta named \['c'\]"),
        ([["a", "b"], [1, 1]], {"method": "ties"}, dh.SpecError, "choose one of"),
        ([["a", "b"], [1, 1]], {"rank": 2}, dh.SpecError, "method='svd'"),
        ([["a", "b"], [1, 1]], {"method": "svd", "rank": 0}, dh.SpecError, "positive integer"),
        ([["a", "b"], [1, 1]], {"name": "a"}, dh.DeltaStateError, "already attached"),
        ([["a", "b"], [1, 1]], {"name": "not valid"}, dh.SpecError, "identifier"),
    ],
)
def test_bad_arguments_are_refused_with_the_model_unchanged(args, options, error, match):
    model = two_loras()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dh.combine(model, *args, **{"name": "ab", **options})
    assert_restored(model, before)
    assert sorted(dh.deltas(model)) == ["a", "b"]
    assert all(d.enabled for d in dh.deltas(model).values())


@pytest.mark.parametrize(
    "spec, match",
    [
        (dh.LoRA(targets=["q_proj"], r=2, dora=True), "DoRA"),
        (dh.LoRA(targets=["q_proj"], r=2, init="pissa"), "init='pissa'"),
        (dh.IA3(targets=["k_proj"]), "a ia3 part"),
        ([dh.LoRA(targets=["v_proj"], r=2), dh.Full(targets=["lm_head"])], "a full part"),
    ],
    ids=["dora", "pissa", "ia3", "lora+full"],
)
def test_sources_other_than_plain_lora_are_refused(spec, match):
    model = two_loras()
    dh.attach(model, spec, name="other")
    before = snapshot(model)
    with pytest.raises(dh.UnsupportedOperationError, match=match):
        dh.combine(model, ["a", "other"], [1, 1], name="ab")
    assert_restored(model, before)


def test_merged_sources_are_refused():
    model = two_loras().eval()
    dh.deltas(model)["b"].merge()
    before = snapshot(model)
    with pytest.raises(dh.DeltaStateError, match=r"'b' is merged.*unmerge"):
        dh.combine(model, ["a", "b"], [1, 1], name="ab")
    assert_restored(model, before)
