"""Delta files are data, never code: thousands of mutated files either load or raise ours.

Every mutated or truncated file must load (and then hold exactly the tensors the file
holds) or raise a ``dh.DeltaError``; no other exception, no hang, and a failed load
leaves the model bit-identical.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_checks import assert_restored, snapshot
from safetensors import safe_open
from torch import nn

import deltahooks as dh


def every_method() -> list[dh.DeltaSpec]:
    """One part of every built-in method on a tiny GPT-2, so the fuzzer mutates each one."""
    return [
        dh.LoRA(
            targets=["wte", "c_attn", "mlp.c_fc"], r=2, init="random", rank_pattern={"c_fc": 1}
        ),
        dh.LoRA(targets=["attn.c_proj"], r=1, dora=True),
        dh.Full(targets=["ln_f"]),
        dh.Adapter(targets=["mlp.c_proj"], bottleneck=2, init="random"),
        dh.ParallelAdapter(targets=["mlp.c_proj"], bottleneck=2),
        dh.LowRankAdapter(targets=["attn.c_proj"], reduction_factor=2),
        dh.Compacter(targets=["attn.c_proj"], reduction_factor=2, phm_dim=2),
        dh.ReFT(targets=dh.Paths(["transformer.h.0"]), rank=1, positions="f1+l1"),
        dh.BitFit(targets=["mlp.c_fc"]),
        dh.LNTuning(targets=["ln_1"]),
        dh.LoHa(targets=["mlp.c_fc"], r=1),
        dh.LoKr(targets=["attn.c_proj"], r=1),
        dh.IA3(targets=["attn.c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
        dh.OFT(targets=["attn.c_proj"], block_size=4),
        dh.BOFT(targets=["mlp.c_fc"], block_size=2, butterfly_factor=2),
        dh.PromptTuning(num_tokens=2),
        dh.PrefixTuning(num_tokens=2, reparameterize=False),
        dh.VeRA(targets=["mlp.c_fc"], r=2),
        dh.AdaLoRA(targets=["mlp.c_proj"], init_r=2, target_r=1, total_step=9),
        dh.LoRA(targets=dh.Paths(["transformer.h.0.mlp.c_proj.weight"]), r=1, init="random"),
    ]


def _valid_file() -> tuple[nn.Module, bytes]:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    delta = dh.attach(model, every_method())
    path = os.path.join(tempfile.mkdtemp(), "valid.safetensors")
    delta.save(path)
    delta.detach()
    with open(path, "rb") as handle:
        return model, handle.read()


PRISTINE, VALID = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _leaves(node, path=()):
    """Every (path, value) inside a JSON document, containers included."""
    yield path, node
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        yield from _leaves(child, (*path, key))


def _set(node, path, value):
    if not path:
        return value
    node[path[0]] = _set(node[path[0]], path[1:], value)
    return node


@st.composite
def semantic_mutation(draw) -> bytes:
    """A well-formed safetensors file whose header or delta metadata says something else."""
    header = json.loads(VALID[8:HEADER_END])
    if draw(st.booleans()):  # our own metadata: replace any node of the delta JSON
        delta = json.loads(header["__metadata__"]["delta"])
        path, _ = draw(st.sampled_from(list(_leaves(delta))))
        delta = _set(delta, path, draw(json_values))
        header["__metadata__"]["delta"] = json.dumps(delta)
    else:  # the safetensors layer: a tensor's dtype, shape or offsets
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if field == "dtype":
            value = draw(
                st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3"])
            )
        else:
            value = draw(st.lists(st.integers(0, 64), min_size=0, max_size=3))
        header[key][field] = value
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + VALID[HEADER_END:]


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["bytes", "truncate", "splice", "semantic", "semantic"]))
    if kind == "semantic":
        return draw(semantic_mutation())
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "splice":  # replace a header slice with printable junk (keeps it JSON-ish)
        start = draw(st.integers(8, HEADER_END - 1))
        end = draw(st.integers(start, min(start + 40, HEADER_END)))
        junk = draw(st.text(alphabet='{}[]":,0123456789-eE.abcnulltrfs ', max_size=40)).encode()
        return bytes(data[:start] + junk + data[end:])
    for _ in range(draw(st.integers(1, 6))):
        in_header = draw(st.booleans()) or draw(st.booleans())  # 3 in 4 hit the header
        low, high = (0, HEADER_END - 1) if in_header else (HEADER_END, len(data) - 1)
        data[draw(st.integers(low, high))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=2000)
@given(blob=mutated_files())
def test_mutated_files_load_exactly_or_raise_our_error(blob):
    model = copy.deepcopy(PRISTINE)
    before = snapshot(model)
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as handle:
        handle.write(blob)
    try:
        try:
            delta = dh.load(model, handle.name, allow_nonfinite=True)
        except dh.DeltaError:
            assert_restored(model, before)
            assert dh.deltas(model) == {}
            return
        with safe_open(handle.name, framework="pt") as stored:
            for key, value in delta.state_dict().items():
                want = stored.get_tensor(key).to(value.dtype)
                torch.testing.assert_close(value, want, rtol=0, atol=0, equal_nan=True)
        delta.detach()
        assert_restored(model, before)
    finally:
        os.unlink(handle.name)


def test_the_fuzzed_file_holds_every_method():
    header = json.loads(VALID[8:HEADER_END])["__metadata__"]["delta"]
    stored = {part["method"] for part in json.loads(header)["parts"]}
    built_in = {
        name
        for name, cls in dh.spec.METHODS.items()
        if cls.__module__.startswith("deltahooks.methods.")
    }
    assert stored == built_in
