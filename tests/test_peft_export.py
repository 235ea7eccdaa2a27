"""Writing PEFT adapter directories: PEFT itself loads them with our outputs, both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_checks import assert_restored, snapshot
from tiny_models import MODELS

import deltahooks as dh

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def randomise(delta, seed=1):
    """Every delta tensor away from its identity start, so a mix-up shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in delta.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.2)


def peft_from(directory, base):
    """PEFT's model of a copy of the base model, loaded from ``directory``."""
    return peft.PeftModel.from_pretrained(copy.deepcopy(base).eval(), directory).eval()


SPECS = {
    "llama": [
        dh.LoRA(
            targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            r=4,
            alpha=8,
            rslora=True,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"v_proj": 3.0},
        ),
        dh.Full(targets=["lm_head"]),
    ],
    "gpt2": [dh.LoRA(targets=["c_attn", "c_fc"], r=2, alpha=4, dropout=0.1)],
    "llama-dora": [dh.LoRA(targets=["q_proj", "down_proj"], r=2, dora=True)],
}


@pytest.mark.parametrize("name", list(SPECS))
def test_peft_loads_our_lora_with_the_same_outputs(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = MODELS[name.split("-")[0]]()
    base = copy.deepcopy(model.eval())
    delta = dh.attach(model, SPECS[name])
    randomise(delta)
    delta.save_peft(tmp_path / "adapter")
    theirs = peft_from(tmp_path / "adapter", base)
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (name == "gpt2")
    assert config["use_dora"] == name.endswith("dora")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_to_ours_to_peft_keeps_the_outputs(name, tmp_path):
    """A PEFT-made adapter, imported and written again, is the same adapter to PEFT."""
    torch.manual_seed(0)
    base, inputs = MODELS[name]()
    pristine = copy.deepcopy(base.eval())
    modules = ["q_proj", "v_proj"] if name == "llama" else ["c_attn"]
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=modules, init_lora_weights=False)
    made = peft.get_peft_model(copy.deepcopy(base).eval(), config).eval()
    made.save_pretrained(tmp_path / "made")
    want = logits(made, inputs)
    delta = dh.load_peft(base.eval(), tmp_path / "made")
    torch.testing.assert_close(logits(base, inputs), want, rtol=0, atol=1e-5)
    delta.save_peft(tmp_path / "again")
    torch.testing.assert_close(
        logits(peft_from(tmp_path / "again", pristine), inputs), want, rtol=0, atol=1e-5
    )


OTHER_METHODS = {
    "ia3-gpt2": (
        "gpt2",
        lambda: dh.IA3(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
        lambda: peft.IA3Config(
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            init_ia3_weights=False,
        ),
    ),
    "ia3": (
        "llama",
        lambda: dh.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
        lambda: peft.IA3Config(
            target_modules=["k_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
    ),
    "loha": (
        "llama",
        lambda: dh.LoHa(targets=["q_proj", "down_proj"], r=2, rank_pattern={"down_proj": 3}),
        lambda: peft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=2, init_weights=False),
    ),
    "lokr": (
        "llama",
        lambda: dh.LoKr(targets=["q_proj", "down_proj"], r=2, decompose_both=True),
        lambda: peft.LoKrConfig(
            target_modules=["q_proj", "v_proj"], r=2, decompose_both=True, init_weights=False
        ),
    ),
    "ln_tuning": (
        "llama",
        lambda: dh.LNTuning(targets=["input_layernorm", "model.norm"]),
        lambda: peft.LNTuningConfig(target_modules=["post_attention_layernorm"]),
    ),
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_methods_go_both_ways_with_the_same_outputs(method, tmp_path):
    name, ours_spec, peft_config = OTHER_METHODS[method]
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    base = copy.deepcopy(model.eval())
    delta = dh.attach(model, ours_spec())
    randomise(delta)
    delta.save_peft(tmp_path / "ours")
    want = logits(model, inputs)
    torch.testing.assert_close(
        logits(peft_from(tmp_path / "ours", base), inputs), want, atol=1e-5, rtol=0
    )
    delta.detach()
    # PEFT-made (random vectors / perturbed copies) -> ours -> PEFT
    made = peft.get_peft_model(copy.deepcopy(base), peft_config()).eval()
    with torch.no_grad():
        for param in made.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    made.save_pretrained(tmp_path / "made")
    want = logits(made, inputs)
    imported = dh.load_peft(model, tmp_path / "made")
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=0)
    imported.save_peft(tmp_path / "again")
    again = logits(peft_from(tmp_path / "again", base), inputs)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=0)


def test_what_peft_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    model, _ = MODELS["llama"]()
    before = snapshot(model)
    two_methods = dh.attach(model, [dh.LoRA(targets=["q_proj"]), dh.IA3(targets=["k_proj"])])
    with pytest.raises(dh.UnsupportedOperationError, match="one adapter type"):
        two_methods.save_peft(tmp_path / "a")
    two_methods.detach()
    two_loras = dh.attach(
        model, [dh.LoRA(targets=["q_proj"]), dh.LoRA(targets=["v_proj"], dropout=0.1)]
    )
    with pytest.raises(dh.UnsupportedOperationError, match="differ in dropout"):
        two_loras.save_peft(tmp_path / "b")
    two_loras.detach()
    pissa = dh.attach(model, dh.LoRA(targets=["q_proj"], r=2, init="pissa"))
    with pytest.raises(dh.UnsupportedOperationError, match="residual"):
        pissa.save_peft(tmp_path / "d")
    pissa.detach()
    prompt = dh.attach(model, dh.ReFT(targets=dh.Paths(["model.layers.0"]), rank=1))
    with pytest.raises(dh.UnsupportedOperationError, match="no PEFT equivalent"):
        prompt.save_peft(tmp_path / "c")
    prompt.detach()
    assert not any(tmp_path.iterdir())
    assert_restored(model, before)


PROMPTS = {
    "prompt-llama": ("llama", lambda: dh.PromptTuning(num_tokens=3)),
    "prompt-bert": ("bert", lambda: dh.PromptTuning(num_tokens=3)),
    "prefix-llama": ("llama", lambda: dh.PrefixTuning(num_tokens=3, hidden=8)),
    "prefix-gpt2": ("gpt2", lambda: dh.PrefixTuning(num_tokens=3, reparameterize=False)),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_and_prefix_tuning_go_both_ways_with_the_same_outputs(case, tmp_path):
    name, make = PROMPTS[case]
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    base = copy.deepcopy(model.eval())
    delta = dh.attach(model, make())
    randomise(delta)
    want = logits(model, inputs)
    delta.save_peft(tmp_path / "ours")
    theirs = peft_from(tmp_path / "ours", base)
    torch.testing.assert_close(logits(theirs, inputs), want, rtol=0, atol=1e-5)
    delta.detach()
    imported = dh.load_peft(model, tmp_path / "ours")  # PEFT's file (its layout) -> ours
    torch.testing.assert_close(logits(model, inputs), want, rtol=0, atol=1e-5)
    imported.save_peft(tmp_path / "again")
    again = logits(peft_from(tmp_path / "again", base), inputs)
    torch.testing.assert_close(again, want, rtol=0, atol=1e-5)


def test_prompts_on_an_encoder_decoder_are_refused_both_ways(tmp_path):
    model, _ = MODELS["t5"]()
    delta = dh.attach(model, dh.PromptTuning(num_tokens=2))
    with pytest.raises(dh.UnsupportedOperationError, match="encoder-decoder"):
        delta.save_peft(tmp_path / "t5")
    assert not (tmp_path / "t5").exists()
