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
    "oft": (  # default block sizes: 32 on q_proj and the embedding, PEFT's 24 on down_proj
        "llama",
        lambda: dh.OFT(targets=["q_proj", "down_proj", "embed_tokens"]),
        lambda: peft.OFTConfig(target_modules=["q_proj", "down_proj"], r=0, oft_block_size=8),
    ),
    "oft-exact": (
        "llama",
        lambda: dh.OFT(targets=["v_proj"], block_size=4, use_cayley_neumann=False),
        lambda: peft.OFTConfig(
            target_modules=["v_proj"], oft_block_size=4, use_cayley_neumann=False
        ),
    ),
    "boft": (
        "llama",
        lambda: dh.BOFT(targets=["q_proj", "down_proj"], block_size=4),
        lambda: peft.BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=4),
    ),
    "vera": (
        "llama",
        lambda: dh.VeRA(targets=["q_proj", "down_proj"], r=4, d_initial=0.2),
        lambda: peft.VeraConfig(target_modules=["q_proj", "down_proj"], r=4),
    ),
    "vera-gpt2": (
        "gpt2",
        lambda: dh.VeRA(targets=["c_attn"], r=4, save_projection=False, projection_prng_key=3),
        lambda: peft.VeraConfig(
            target_modules=["c_attn"], r=4, save_projection=False, projection_prng_key=5
        ),
    ),
    "adalora": (
        "llama",
        lambda: dh.AdaLoRA(targets=["q_proj", "down_proj"], init_r=4, target_r=2, total_step=10),
        lambda: peft.AdaLoraConfig(
            target_modules=["q_proj", "down_proj"], init_r=3, target_r=2, total_step=10
        ),
    ),
    "adalora-gpt2": (
        "gpt2",
        lambda: dh.AdaLoRA(targets=["c_attn"], init_r=4, target_r=2, total_step=10, alpha=0),
        lambda: peft.AdaLoraConfig(
            target_modules=["c_attn"], init_r=3, target_r=2, total_step=10, lora_alpha=0
        ),
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


# ------------------------------------------------------------- OFT, BOFT, VeRA, AdaLoRA
def saved(directory):
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


def test_the_oft_block_size_rule_is_peft_s():
    """Our reimplementation of PEFT's per-layer adjustment agrees with PEFT's own code."""
    from peft.tuners.oft.layer import OFTLayer

    from deltahooks.interop.peft.oft import one_block_size, peft_block_size

    for width in range(1, 70):
        for request in range(1, 80):
            if width % request == 0 and request <= width:
                want = request  # PEFT adjusts only what does not fit
            else:
                want = OFTLayer.adjust_oft_parameters(None, width, request)
            assert peft_block_size(width, request) == want, (width, request)
    assert one_block_size({"a": (32, 32), "b": (48, 24)}, prefer=[32]) == 32
    found = one_block_size({"a": (32, 32), "b": (20, 20)})  # 25: 32 on a, all of b
    assert (peft_block_size(32, found), peft_block_size(20, found)) == (32, 20)
    assert one_block_size({"a": (32, 4), "b": (32, 8)}) is None


def test_oft_on_a_conv2d_and_a_linear_goes_to_peft(tmp_path):
    """ViT's patch projection (a Conv2d, filters 3·8·8 wide) and the attention queries;
    PEFT's rotated weight ``W Rᵀ`` (its merge) is ours."""
    torch.manual_seed(0)
    model, inputs = MODELS["vit"]()
    base = copy.deepcopy(model.eval())
    delta = dh.attach(model, dh.OFT(targets=["projection", "q_proj"], block_size=16))
    randomise(delta)
    delta.save_peft(tmp_path / "vit")
    config, tensors = saved(tmp_path / "vit")
    assert config["oft_block_size"] == 16 and config["r"] == 0
    assert tensors[
        "base_model.model.vit.embeddings.patch_embeddings.projection.oft_R.weight"
    ].shape == (
        12,
        120,
    )
    theirs = peft_from(tmp_path / "vit", base)
    theirs.merge_adapter()  # PEFT's unmerged k×k forward is not W Rᵀ (see test_oft.py)
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), rtol=0, atol=1e-5)


@pytest.fixture
def peft_butterflies():
    """PEFT's BOFT with more than one butterfly factor without its CUDA extension (PEFT
    falls back to one factor without it): its block-diagonal kernel replaced by torch's."""
    from unittest import mock

    from peft.tuners.boft import layer

    def block_diag(blocks):
        return torch.stack([torch.block_diag(*level) for level in blocks])

    with (
        mock.patch.object(layer, "get_fbd_cuda", lambda: True),
        mock.patch.object(layer.FastBlockDiag, "apply", block_diag),
    ):
        yield


def test_boft_with_butterflies_and_a_conv2d_goes_both_ways(peft_butterflies, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1)
    ).eval()
    x = torch.randn(2, 8, 6, 6)  # filter widths 72 and 8
    base = copy.deepcopy(model)
    delta = dh.attach(model, dh.BOFT(targets=["0", "2"], block_size=4, butterfly_factor=2))
    randomise(delta)
    delta.save_peft(tmp_path / "ours")
    config, tensors = saved(tmp_path / "ours")
    assert (config["boft_block_size"], config["boft_n_butterfly_factor"]) == (4, 2)
    assert tensors["base_model.model.0.boft_s"].shape == (1, 8)  # PEFT's Conv2d layout
    with torch.no_grad():
        want = model(x)
        theirs = peft_from(tmp_path / "ours", base)
        torch.testing.assert_close(theirs(x), want, rtol=0, atol=1e-5)
        delta.detach()
        again = dh.load_peft(model, tmp_path / "ours")
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
        again.save_peft(tmp_path / "again")
        assert saved(tmp_path / "again")[0] == config
        torch.testing.assert_close(peft_from(tmp_path / "again", base)(x), want, rtol=0, atol=1e-5)


def test_vera_projections_are_peft_s_model_level_keys(tmp_path):
    model, _ = MODELS["llama"]()
    with_them = dh.attach(model, dh.VeRA(targets=["q_proj", "down_proj"], r=4))
    with_them.save_peft(tmp_path / "with")
    config, tensors = saved(tmp_path / "with")
    assert config["save_projection"] is True
    torch.testing.assert_close(tensors["base_model.vera_A"], with_them.shared["vera_A"])
    torch.testing.assert_close(tensors["base_model.vera_B"], with_them.shared["vera_B"])
    assert tensors["base_model.vera_A"].shape == (4, 48)  # the widest fan-in: down_proj
    with_them.detach()
    without = dh.attach(model, dh.VeRA(targets=["q_proj"], r=4, save_projection=False))
    without.save_peft(tmp_path / "without")
    config, tensors = saved(tmp_path / "without")
    assert config["save_projection"] is False
    assert not any("vera_A" in key or "vera_B" in key for key in tensors)


@pytest.mark.parametrize("alpha", [8, 0])
def test_pruned_adalora_is_written_as_peft_writes_it(alpha, tmp_path):
    """PEFT's allocator pruned triplets (rank_pattern set, their lora_E zeroed); PEFT saves
    only the kept ones. Ours, from that file, writes the same config pattern and tensors,
    and PEFT loads ours with the trained model's outputs (a layer with no triplet left too).
    With lora_alpha=0, PEFT's reload of its own file scales a pruned layer by its kept rank,
    not init_r as its trained model did; ours writes lora_alpha=init_r, the trained scale."""
    torch.manual_seed(0)
    base, inputs = MODELS["llama"]()
    base.eval()
    config = peft.AdaLoraConfig(
        target_modules=["q_proj", "down_proj"],
        init_r=4,
        target_r=2,
        total_step=10,
        lora_alpha=alpha,
    )
    made = peft.get_peft_model(copy.deepcopy(base), config).eval()
    pattern = {}
    with torch.no_grad():
        for name, param in made.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
            if name.endswith("lora_E.default"):
                path = name.removeprefix("base_model.model.").removesuffix(".default")
                keep = [True, False, True, False] if "q_proj" in name else [False] * 4
                if "layers.1.self_attn" in name:
                    keep = [True] * 4
                param[~torch.tensor(keep)] = 0.0  # as PEFT's mask_using_rank_pattern
                pattern[path] = keep
    made.peft_config["default"].rank_pattern = pattern
    made.save_pretrained(tmp_path / "made")
    want = logits(made, inputs)
    peft_config, peft_tensors = saved(tmp_path / "made")
    assert peft_tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 2

    ours = copy.deepcopy(base)
    delta = dh.load_peft(ours, tmp_path / "made")
    torch.testing.assert_close(logits(ours, inputs), want, rtol=0, atol=1e-5)
    delta.save_peft(tmp_path / "ours")
    ours_config, ours_tensors = saved(tmp_path / "ours")
    assert ours_config["rank_pattern"] == peft_config["rank_pattern"] == pattern
    assert ours_config["lora_alpha"] == (alpha or 4)
    assert sorted(ours_tensors) == sorted(peft_tensors)
    for key, tensor in peft_tensors.items():
        assert torch.equal(ours_tensors[key], tensor), key
    torch.testing.assert_close(
        logits(peft_from(tmp_path / "ours", base), inputs), want, rtol=0, atol=1e-5
    )


def test_untrained_adalora_is_written_whole(tmp_path):
    """Every lora_E zero (the start, as PEFT's) is no pruning: init_r triplets, no pattern."""
    model, _ = MODELS["llama"]()
    delta = dh.attach(model, dh.AdaLoRA(targets=["q_proj"], init_r=4, target_r=2, total_step=5))
    delta.save_peft(tmp_path / "fresh")
    config, tensors = saved(tmp_path / "fresh")
    assert config["rank_pattern"] is None
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 32)


REFUSED = {
    "oft-mixed-blocks": (
        "llama",
        lambda: [
            dh.OFT(targets=["q_proj"], block_size=4),
            dh.OFT(targets=["v_proj"], block_size=8),
        ],
        r"one oft_block_size.*q_proj.*4 of 32.*v_proj.*8 of 32",
    ),
    "oft-conv1d": ("gpt2", lambda: dh.OFT(targets=["c_attn"]), r"Conv1D.*Linear, Conv2d"),
    "boft-mixed-blocks": (
        "llama",
        lambda: [
            dh.BOFT(targets=["q_proj"], block_size=4),
            dh.BOFT(targets=["v_proj"], block_size=8),
        ],
        r"one boft_block_size.*block_size=4.*block_size=8",
    ),
    "boft-mixed-factors": (
        "llama",
        lambda: [
            dh.BOFT(targets=["q_proj"], block_size=4),
            dh.BOFT(targets=["v_proj"], block_size=4, butterfly_factor=2),
        ],
        r"butterfly_factor=1.*butterfly_factor=2",
    ),
    "boft-conv1d": ("gpt2", lambda: dh.BOFT(targets=["c_fc"]), r"Conv1D.*Linear and Conv2d"),
    "adalora-settings": (
        "llama",
        lambda: [
            dh.AdaLoRA(targets=["q_proj"], init_r=4, target_r=2, total_step=5),
            dh.AdaLoRA(targets=["v_proj"], init_r=6, target_r=2, total_step=5),
        ],
        r"differ in init_r",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_peft_cannot_express_is_refused_with_nothing_written(case, tmp_path):
    name, make, match = REFUSED[case]
    model, inputs = MODELS[name]()
    model.eval()
    before = snapshot(model)
    delta = dh.attach(model, make())
    randomise(delta)
    want = logits(model, inputs)
    with pytest.raises(dh.UnsupportedOperationError, match=match):
        delta.save_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    torch.testing.assert_close(logits(model, inputs), want, rtol=0, atol=0)
    delta.detach()
    assert_restored(model, before)
