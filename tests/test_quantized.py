"""Deltas on quantized bases (QLoRA): bitsandbytes NF4 / int8 layers, torchao int8 weights.

A quantized layer is recognised by its weight (integers, or a tensor subclass holding
integers), never by its class: the same tests run on a toy int8 layer defined here.
Delta tensors take the layer's real widths and compute dtype; methods that only read
``x`` and ``y`` work; merging and methods that read the weight are refused; detach
leaves the packed weights as they were.
"""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh
from deltahooks.layers import compute_dtype, is_quantized, widths

HIDDEN = 64  # bitsandbytes' NF4 blocks are 64 wide: a narrower layer cannot be packed on CPU


class Int8Linear(nn.Linear):
    """A toy weight-only int8 layer: int8 weight, one float scale per output row."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None)
        scale = layer.weight.detach().abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter(
            (layer.weight.detach() / scale).round().to(torch.int8), requires_grad=False
        )
        self.register_buffer("scale", scale)
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


def toy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Int8Linear(nn.Linear(16, 24)), nn.ReLU(), Int8Linear(nn.Linear(24, 8, bias=False))
    )


def test_a_packed_layer_is_recognised_by_its_weight_and_keeps_its_real_widths():
    model = toy_model()
    assert is_quantized(model[0].weight) and not is_quantized(model[0].bias)
    assert widths(model[0]) == (16, 24) and compute_dtype(model[0]) == torch.float32
    assert compute_dtype(model[2]) == torch.float32  # from its float scale buffer
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2, init="random"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in delta.state_dict().items()} == {
        "0.lora_A": ((2, 16), torch.float32),
        "0.lora_B": ((24, 2), torch.float32),
        "2.lora_A": ((2, 24), torch.float32),
        "2.lora_B": ((8, 2), torch.float32),
    }


def test_lora_on_a_toy_int8_layer_adds_its_update_and_detaches_exactly():
    model = toy_model()
    x = torch.randn(3, 16)
    base = model(x)
    before = snapshot(model)
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2, alpha=4, init="random"))
    a, b = delta.state_dict()["0.lora_A"], delta.state_dict()["0.lora_B"]
    hidden = model[0](x)
    expected = nn.functional.linear(x, model[0].weight.float() * model[0].scale, model[0].bias)
    torch.testing.assert_close(hidden, expected + 2.0 * (x @ a.t() @ b.t()), atol=1e-6, rtol=0)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    model.eval()
    with pytest.raises(dh.UnsupportedOperationError, match="quantized weight"):
        delta.merge()
    assert not delta.merged
    delta.detach()
    assert_restored(model, before)
    assert torch.equal(model(x), base)


# --------------------------------------------------------------------- bitsandbytes
def _tiny_llama_checkpoint(folder) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def load_quantized(checkpoint: str, bits: int) -> nn.Module:
    """A fresh tiny Llama with bitsandbytes layers: NF4 (compute float32) or int8.

    It stays in training mode: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights
    for inference at the first eval forward whose input needs no gradient, after which the
    layer passes no gradient to its input (PEFT's QLoRA hits it; a deltahooks delta turns it
    off while attached, see test_an_eval_forward_before_training_keeps_every_nf4_gradient).
    """
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    if bits == 4:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=config, device_map="cpu"
    )
    return model.train()


BITS = [pytest.param(4, id="nf4"), pytest.param(8, id="int8")]
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60], [2, 71, 33, 14, 90, 6, 25]])


@pytest.mark.parametrize("bits", BITS)
def test_lora_on_bitsandbytes_layers_has_the_real_shapes_and_trains(checkpoint, bits):
    model = load_quantized(checkpoint, bits)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not q_proj.weight.is_floating_point()  # packed storage, e.g. uint8 (2048, 1)
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"))
    tensors = delta.state_dict()
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, HIDDEN)
    assert tensors["model.layers.0.self_attn.q_proj.lora_B"].shape == (HIDDEN, 4)
    assert tensors["model.layers.0.self_attn.v_proj.lora_B"].shape == (32, 4)  # 2 kv heads
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    for key, tensor in delta.named_parameters():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key


def _peft_pair(checkpoint: str, bits: int):
    """PEFT's QLoRA and ours on two loads of one checkpoint, with PEFT's factors copied."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        load_quantized(checkpoint, bits),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    ours = load_quantized(checkpoint, bits)
    delta = dh.attach(ours, dh.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8))
    factors = {}
    for name, tensor in theirs.named_parameters():
        if ".lora_" in name:
            path, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
            factors[f"{path}.lora_{rest.split('.')[0]}"] = tensor.detach()
    assert factors.keys() == delta.state_dict().keys()
    delta.load_state_dict(factors)
    return theirs, ours, delta


@pytest.mark.parametrize("bits", BITS)
def test_lora_on_bitsandbytes_equals_peft_qlora(checkpoint, bits):
    theirs, ours, delta = _peft_pair(checkpoint, bits)
    expected = theirs(input_ids=IDS, labels=IDS)
    got = ours(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    grads = {
        name.removeprefix("base_model.model.").replace(".default.weight", ""): t.grad
        for name, t in theirs.named_parameters()
        if ".lora_" in name
    }
    for key, tensor in delta.named_parameters():
        torch.testing.assert_close(tensor.grad, grads[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", BITS)
def test_merge_on_bitsandbytes_is_refused_and_detach_leaves_the_packed_weights(checkpoint, bits):
    model = load_quantized(checkpoint, bits)
    before = snapshot(model)
    packed = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()
    }
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"))
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    model.eval()
    with pytest.raises(dh.UnsupportedOperationError, match=r"quantized weight.*requantising"):
        delta.merge()
    assert not delta.merged
    model.train()
    delta.detach()
    assert_restored(model, before)
    for name, tensor in model.named_parameters():
        if name in packed:
            assert torch.equal(tensor, packed[name]), name


def _as_on_an_avx512_bf16_cpu(model: nn.Module) -> list[nn.Module]:
    """The model's 4-bit layers with bitsandbytes' CPU inference repacking switched on, as it
    is on a CPU with AVX512-BF16 (its kernel then has no backward; elsewhere the repacked
    weights still compute through a general path, in bfloat16 scales)."""
    layers = [m for m in model.modules() if "support_avx512bf16_for_cpu" in m.__dict__]
    assert len(layers) == 14  # 7 per decoder layer
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return layers


def _repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def _evaluate(model: nn.Module) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    model.train()


def test_an_eval_forward_before_training_keeps_every_nf4_gradient(checkpoint):
    """One no_grad eval forward before training must not cut the gradients: bitsandbytes
    would repack every 4-bit layer for inference for good, and no gradient would reach the
    LoRA tensors behind them (q_proj and v_proj all sit before an o_proj)."""
    reference = load_quantized(checkpoint, 4)  # never evaluated: trains as it should
    expected = dh.attach(reference, dh.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"))
    reference(input_ids=IDS, labels=IDS).loss.backward()

    model = load_quantized(checkpoint, 4)
    layers = _as_on_an_avx512_bf16_cpu(model)
    before = snapshot(model)
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=4))
    delta.load_state_dict(expected.state_dict())
    _evaluate(model)
    assert not any(_repacked(layer) for layer in layers)
    model(input_ids=IDS, labels=IDS).loss.backward()
    wanted = dict(expected.named_parameters())
    for key, tensor in delta.named_parameters():
        assert tensor.grad is not None, key
        torch.testing.assert_close(tensor.grad, wanted[key].grad, atol=1e-6, rtol=1e-5)
    delta.detach()
    assert all(layer.support_avx512bf16_for_cpu is True for layer in layers)
    assert_restored(model, before)
    _evaluate(model)  # detached: bitsandbytes repacks as it would without deltahooks
    assert all(_repacked(layer) for layer in layers)


def test_layers_repacked_before_attach_get_the_trainable_layout_back(checkpoint):
    """An eval forward before attach has repacked the layers already (rounding their scales
    to bfloat16 for good: the base is no longer the checkpoint); attach unpacks them, so the
    LoRA tensors behind them get gradients."""
    model = load_quantized(checkpoint, 4)
    layers = _as_on_an_avx512_bf16_cpu(model)
    _evaluate(model)
    assert all(_repacked(layer) for layer in layers)  # what bitsandbytes does by itself
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"))
    assert not any(_repacked(layer) for layer in layers)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for key, tensor in delta.named_parameters():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
    delta.detach()
    assert all(layer.support_avx512bf16_for_cpu is True for layer in layers)


WEIGHT_READERS = [
    pytest.param(lambda: dh.LoRA(targets=["q_proj"], dora=True), id="dora"),
    pytest.param(lambda: dh.LoRA(targets=["q_proj"], init="pissa", r=2), id="pissa"),
    pytest.param(lambda: dh.LoRA(targets=["q_proj"], init="olora", r=2), id="olora"),
    pytest.param(lambda: dh.LoHa(targets=["q_proj"]), id="loha"),
    pytest.param(lambda: dh.LoKr(targets=["q_proj"]), id="lokr"),
    pytest.param(lambda: dh.OFT(targets=["q_proj"]), id="oft"),
    pytest.param(lambda: dh.Full(targets=["q_proj"]), id="full"),
]


@pytest.mark.parametrize("make_spec", WEIGHT_READERS)
def test_methods_that_read_the_weight_refuse_a_quantized_layer(checkpoint, make_spec):
    model = load_quantized(checkpoint, 4)
    before = snapshot(model)
    with pytest.raises(dh.UnsupportedModuleError, match="reads or rewrites the layer's weight"):
        dh.attach(model, make_spec())
    assert_restored(model, before)


def test_a_parameter_target_on_a_packed_weight_is_refused(checkpoint):
    model = load_quantized(checkpoint, 4)
    before = snapshot(model)
    with pytest.raises(dh.UnsupportedModuleError, match="floating 2-D weight"):
        dh.attach(model, dh.LoRA(targets=["layers.0.self_attn.q_proj.weight"]))
    assert_restored(model, before)


ADDITIVE = [
    pytest.param(
        lambda: dh.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]), id="ia3"
    ),
    pytest.param(lambda: dh.VeRA(targets=["q_proj", "v_proj"], r=4), id="vera"),
    pytest.param(lambda: dh.Adapter(targets=["o_proj"], bottleneck=8), id="adapter"),
]


@pytest.mark.parametrize("make_spec", ADDITIVE)
def test_other_methods_that_read_only_x_and_y_train_on_nf4(checkpoint, make_spec):
    model = load_quantized(checkpoint, 4)
    before = snapshot(model)
    delta = dh.attach(model, make_spec())
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in delta.parameters())
    model.eval()
    with pytest.raises(dh.UnsupportedOperationError):
        delta.merge()
    model.train()
    delta.detach()
    assert_restored(model, before)


# --------------------------------------------------------------------------- torchao
def test_lora_on_torchao_int8_weight_only():
    torchao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    assert model[0].weight.is_floating_point() and is_quantized(model[0].weight)
    x = torch.randn(4, 32)
    base = model(x)
    qdata = model[0].weight.qdata.clone()
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=4, alpha=8, init="random"))
    a, b = delta.state_dict()["0.lora_A"], delta.state_dict()["0.lora_B"]
    assert a.shape == (4, 32) and b.shape == (48, 4) and a.dtype == torch.float32
    with delta.disabled():
        plain = model[0](x)
    torch.testing.assert_close(model[0](x), plain + 2.0 * (x @ a.t() @ b.t()), atol=1e-5, rtol=0)
    model(x).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in delta.parameters())
    with pytest.raises(dh.UnsupportedModuleError, match="reads or rewrites"):
        dh.attach(model, dh.LoRA(targets=["2"], dora=True), name="dora")
    model.eval()
    with pytest.raises(dh.UnsupportedOperationError, match="quantized weight"):
        delta.merge()
    delta.detach()
    assert torch.equal(model[0].weight.qdata, qdata)
    assert torch.equal(model(x), base)
