"""Every method's rows for the bar (tests/method_bar.py), in one table.

A row is one spec on one model and what the method promises there: which checks run and
the knobs they take, as PEFT's test cases carry their config kwargs. A model name is one of
``tiny_models.MODELS``, ``"mixtral"``, or a plain torch model of ``method_nets.NETS``.
tests/methods/test_method_table.py runs the checks; each method's own file keeps what only
that method has (its formula, PEFT parity, refusals).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from method_nets import NETS
from tiny_models import MODELS, mixtral
from torch import nn

import deltahooks as dh

MAKERS: dict[str, Callable] = {**MODELS, "mixtral": mixtral, **NETS}


@dataclass(frozen=True)
class Row:
    """``spec`` on the model ``MAKERS[model]``; the check flags say what runs for it.

    lifecycle: identity at attach, training changes only the delta and lowers the loss,
        save → load on a fresh model gives the same outputs, detach restores bit for bit
        (and the meta-device plan holds the same tensors, where ``meta``).
    identity, every_grad, atol, other_kernels: that check's knobs (``method_bar``); params: the trainable
        numbers the delta holds (``TRAINABLE``).
    merge: True merges within 1e-5 and unmerges exactly; a string: merge is refused with
        ``dh.UnsupportedOperationError`` matching it (a regular expression); None: not
        checked on this row.
    checkpointing: HF gradient checkpointing (both reentrant modes) gives the same grads.
    compile: ``torch.compile(fullgraph=True)`` matches eager and trains.
    """

    model: str
    spec: dh.DeltaSpec
    variant: str = ""
    lifecycle: bool = True
    identity: bool = True
    every_grad: bool = True
    atol: float = 0.0
    other_kernels: bool = False
    params: int | None = None
    meta: bool = True
    merge: bool | str | None = None
    checkpointing: bool = False
    compile: bool = False

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def id(self) -> str:
        return "-".join(part for part in (self.method, self.model, self.variant) if part)

    @property
    def make(self) -> Callable:
        return MAKERS[self.model]


def check_only(model: str, spec: dh.DeltaSpec, variant: str, **checks) -> Row:
    """A row for a variant of a spec that only some checks take (a merge of a subset of the
    targets, a spec with dropout for checkpointing): no lifecycle."""
    return Row(model, spec, variant, lifecycle=False, **checks)


NON_LINEAR = "non-linear"  # residual adapters refuse merge so
TEXT = ["gpt2", "llama", "bert", "t5", "vit", "opt"]
CHECKPOINTED = ["gpt2", "llama"]


def _per_model(places: dict, make_spec, *, merge=(), checkpointing=(), compile=(), **knobs):
    """A row per model: ``places[model]`` made into a spec; ``merge``, ``checkpointing`` and
    ``compile`` name the models those checks run on (``merge`` a string: every model refuses
    with that message)."""
    return [
        Row(
            name,
            make_spec(place),
            merge=merge if isinstance(merge, str) else (True if name in merge else None),
            checkpointing=name in checkpointing,
            compile=name in compile,
            **knobs,
        )
        for name, place in places.items()
    ]


# ---------------------------------------------------------------- LoRA and its variants
LORA_TARGETS = {"gpt2": ["c_attn", "mlp.c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}
DORA = {
    "gpt2": dh.LoRA(targets=["c_attn", "mlp.c_fc", "wte"], r=2, alpha=4, dora=True),
    "llama": dh.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=2, alpha=4, dora=True),
}
EXPERTS = dh.LoRA(
    targets=["experts.gate_up_proj", "experts.down_proj"],
    r=4,
    alpha=8,
    rank_pattern={"layers.1.mlp.experts.down_proj": 2},
)
STACK = dh.LoRA(targets=["stack", "gate"], r=2, alpha=3)


def _lora_init(name: str, init: str, **options) -> dh.LoRA:
    return dh.LoRA(targets=LORA_TARGETS[name], r=4, alpha=8, init=init, **options)


def _lora_dropout(p: float) -> dh.LoRA:
    return dh.LoRA(targets=LORA_TARGETS["llama"], r=4, dropout=p, init="random")


LORA = [
    # B = 0 at the start: A gets no gradient on the first steps (merging into the tied wte
    # is refused with a DeltaStateError: tests/test_transformers_models.py)
    Row("gpt2", dh.LoRA(targets=["c_attn", "mlp.c_fc", "wte"], r=4), every_grad=False),
    # (compiled with Full in tests/test_compile.py)
    Row("llama", dh.LoRA(targets="all-linear", r=4), every_grad=False, merge=True),
    # checkpointing restores the RNG state before a replay, so the replayed layers draw the
    # dropout masks of the first pass and the gradients are those of a plain backward
    check_only("llama", _lora_dropout(0.0), "dropout0", checkpointing=True),
    check_only("llama", _lora_dropout(0.3), "dropout0.3", checkpointing=True),
    # DoRA from init="random": with B = 0 (or an embedding's A = 0) the other factor would
    # get no gradient at step one, which the bar requires; the start is then not the base
    Row("gpt2", replace(DORA["gpt2"], init="random"), "dora-random", identity=False),
    Row("llama", replace(DORA["llama"], init="random"), "dora-random", identity=False),
    check_only("gpt2", DORA["gpt2"], "dora", checkpointing=True),
    # wte is tied to lm_head: merging into it is refused (tests/test_transformers_models.py)
    check_only(
        "gpt2", replace(DORA["gpt2"], targets=["c_attn", "mlp.c_fc"]), "dora-no-wte", merge=True
    ),
    check_only("llama", DORA["llama"], "dora", merge=True, compile=True),
    # PiSSA / OLoRA: at attach W - sBA + sBA is W only within rounding
    Row("gpt2", _lora_init("gpt2", "pissa"), "pissa", atol=1e-5),
    Row("gpt2", _lora_init("gpt2", "olora"), "olora", atol=1e-5),
    Row("llama", _lora_init("llama", "pissa"), "pissa", atol=1e-5, merge=True, checkpointing=True),
    Row("llama", _lora_init("llama", "olora"), "olora", atol=1e-5, compile=True),
    check_only("llama", _lora_init("llama", "pissa", dora=True), "pissa-dora", merge=True),
    # parameter targets: 3-D expert stacks and a 2-D router weight
    Row("mixtral", EXPERTS, "experts", merge=True, checkpointing=True),
    Row("experts", STACK, merge=True, compile=True),
]

# ---------------------------------------------------------------- LyCORIS: LoHa, LoKr
LOHA = {
    "gpt2": dh.LoHa(targets=["c_attn", "mlp.c_proj"], r=4),  # GPT-2 Conv1D
    "llama": dh.LoHa(targets=["q_proj", "v_proj", "down_proj"], r=4, rank_pattern={"v_proj": 2}),
    "vit": dh.LoHa(targets=["q_proj", "v_proj", "projection"], r=2),  # projection: Conv2d
    "loha-net": dh.LoHa(targets=["conv", "grouped", "seq", "head"], r=2, alpha=3.0),
}
LOKR = {  # full and low-rank factors, decompose_both, rank_pattern
    "gpt2": dh.LoKr(targets=["c_attn", "mlp.c_proj"], r=2),  # GPT-2 Conv1D
    "llama": dh.LoKr(
        targets=["q_proj", "v_proj", "down_proj"],
        r=4,
        rank_pattern={"down_proj": 1},
        decompose_both=True,
    ),
    "vit": dh.LoKr(targets=["q_proj", "v_proj", "projection"], r=2),  # projection: Conv2d
    "lokr-net": dh.LoKr(targets=["conv", "grouped", "head"], r=1, alpha=3.0, factor=2),
}
LYCORIS = [
    *_per_model(
        {n: n for n in LOHA},
        LOHA.get,
        merge=list(LOHA),
        checkpointing=CHECKPOINTED,
        compile=["llama"],
    ),
    *_per_model(
        {n: n for n in LOKR},
        LOKR.get,
        merge=list(LOKR),
        checkpointing=CHECKPOINTED,
        compile=["llama"],
    ),
]

# ---------------------------------------------------------------- scaling vectors
IA3_PLACES = {  # PEFT's own per-architecture targets; ViT (none in PEFT): its patch Conv2d
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "vit": (["k_proj", "v_proj", "fc2", "projection"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "ia3-net": (["embed", "conv", "down", "up", "out"], ["down", "out"]),
}
BITFIT = {  # Llama and T5 have no biases, so the default selects nothing there
    "gpt2": dh.BitFit(),
    "llama": dh.BitFit(targets=["all-linear", "norm"]),
    "bert": dh.BitFit(),
    "t5": dh.BitFit(targets=["q", "v", "wo", "final_layer_norm"]),
    "vit": dh.BitFit(),  # the patch embedding is a Conv2d: channels at dim 1
    "opt": dh.BitFit(),
    "bitfit-net": dh.BitFit(targets=["embed", "conv", "norm", "proj", "ln", "head"]),
}
NEW_BIAS = "has no bias of its own"
VECTORS = [
    *_per_model(
        {name: place for name, place in IA3_PLACES.items() if name != "ia3-net"},
        lambda place: dh.IA3(targets=place[0], feedforward=place[1]),
        merge=list(IA3_PLACES),
        checkpointing=CHECKPOINTED,
        compile=["llama"],
    ),
    # the grouped Conv1d runs another CPU kernel once its weight is frozen
    Row(
        "ia3-net",
        dh.IA3(targets=IA3_PLACES["ia3-net"][0], feedforward=IA3_PLACES["ia3-net"][1]),
        other_kernels=True,
        merge=True,
    ),
    *[
        Row(
            name,
            spec,
            merge={"llama": NEW_BIAS, "t5": NEW_BIAS, "bitfit-net": None}.get(name, True),
            other_kernels=name == "bitfit-net",  # its Conv1d: as IA3's
            checkpointing=name in CHECKPOINTED,
            compile=name == "llama",
        )
        for name, spec in BITFIT.items()
    ],
    check_only(
        "bitfit-net", dh.BitFit(targets=["conv", "norm", "ln", "head"]), "biased", merge=True
    ),
    *_per_model(
        {name: None for name in [*TEXT, "norm-net"]},
        lambda _: dh.LNTuning(),
        merge=[*TEXT, "norm-net"],
        checkpointing=["llama"],
        compile=["llama"],
    ),
]

# ---------------------------------------------------------------- VeRA, AdaLoRA
VERA_PLACES = {  # layers of different widths: each uses its own corner of the projections
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["q_proj", "k_proj", "down_proj"],
    "bert": ["query", "output.dense"],
    "t5": ["q", "wo"],
    "vit": ["q_proj", "fc2"],
    "opt": ["q_proj", "fc2"],
}
ADALORA_PLACES = {
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "output.dense"],
    "t5": ["q", "wo"],
    "vit": ["q_proj", "fc2"],
    "opt": ["q_proj", "fc2"],
}


def _adalora(targets, **options) -> dh.AdaLoRA:
    return dh.AdaLoRA(targets=targets, init_r=4, target_r=2, total_step=10, **options)


# VeRA's λ_b and AdaLoRA's Λ start at zero: the other tensors get gradients after a step
SCALED_PROJECTIONS = [
    *_per_model(
        VERA_PLACES,
        lambda targets: dh.VeRA(targets=targets, r=16),
        merge=CHECKPOINTED,
        compile=["llama"],
        every_grad=False,
    ),
    *[
        check_only(
            n, dh.VeRA(targets=VERA_PLACES[n], r=16, dropout=0.1), "dropout", checkpointing=True
        )
        for n in CHECKPOINTED
    ],
    *[
        Row(
            "vera-net",
            dh.VeRA(targets=nn.Linear, r=8, save_projection=saved),
            variant,
            every_grad=False,
        )
        for saved, variant in [(True, "saved-projection"), (False, "seeded-projection")]
    ],
    *_per_model(ADALORA_PLACES, _adalora, merge=CHECKPOINTED, compile=["llama"], every_grad=False),
    *[
        check_only(n, _adalora(ADALORA_PLACES[n], dropout=0.1), "dropout", checkpointing=True)
        for n in CHECKPOINTED
    ],
    Row(
        "adalora-net",
        dh.AdaLoRA(targets=["conv", "proj"], init_r=3, target_r=2, total_step=10),
        every_grad=False,
        merge=True,
    ),
]

# ---------------------------------------------------------------- orthogonal: OFT, BOFT
OFT_PLACES = {
    "gpt2": ["c_attn", "mlp.c_proj", "wpe"],
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "bert": ["query", "value", "output.dense"],
    "vit": ["q_proj", "v_proj", "fc2", "projection"],
}
OFT_NET = ["embed", "conv", "conv2", "up", "out"]
BOFT_PLACES = {
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "vit": ["q_proj", "fc2", "projection"],
}
BOFT_NET = dh.BOFT(targets=["conv", "conv2", "up", "out"], block_size=2, butterfly_factor=2)
ORTHOGONAL = [
    *_per_model(
        OFT_PLACES,
        lambda targets: dh.OFT(targets=targets),
        merge=["gpt2", "llama", "vit"],
        checkpointing=CHECKPOINTED,
    ),
    Row("oft-net", dh.OFT(targets=OFT_NET, block_size=2), compile=True),
    check_only("oft-net", dh.OFT(targets=OFT_NET), "neumann", merge=True),
    check_only("oft-net", dh.OFT(targets=OFT_NET, use_cayley_neumann=False), "exact", merge=True),
    *_per_model(
        BOFT_PLACES,
        lambda targets: dh.BOFT(targets=targets, butterfly_factor=2),
        merge=list(BOFT_PLACES),
        checkpointing=["gpt2"],
    ),
    Row("boft-net", BOFT_NET, merge=True, compile=True),
]

# ---------------------------------------------------------------- residual adapters
# whole blocks (T5's return tuples), attention modules (OPT/ViT's return tuples), BERT
# ``output`` blocks, the Houlsby placement ``output.dense``, and plain Linear layers
LOW_RANK_TARGETS = {
    "gpt2": [r"re:.*\.h\.\d+"],
    "llama": [r"re:.*layers\.\d+", "down_proj"],
    "bert": ["output.dense", "layer.1.output"],
    "t5": [r"re:.*block\.\d+"],
    "vit": ["mlp", "o_proj"],
    "opt": [r"re:.*layers\.\d+", "fc2"],
}
PARALLEL_TARGETS = {  # BERT ``output`` and fc2 read the FFN's 48-wide intermediate state
    "gpt2": [r"re:.*\.h\.\d+"],
    "llama": [r"re:.*layers\.\d+", "o_proj"],
    "bert": ["output"],
    "t5": [r"re:.*block\.\d+"],
    "vit": ["attention", "fc2"],
    "opt": ["self_attn", "fc2"],
}
COMPACTER_TARGETS = {
    "gpt2": [r"re:.*\.h\.\d+"],
    "llama": ["mlp", "o_proj"],
    "bert": ["output.dense", "layer.0.output"],
    "t5": [r"re:.*block\.\d+"],
    "vit": ["attention", "fc2"],
    "opt": [r"re:.*layers\.\d+", "fc2"],
}
ADAPTERS = [
    *_per_model(
        LOW_RANK_TARGETS,
        lambda t: dh.LowRankAdapter(targets=t, reduction_factor=8, rank=2),
        checkpointing=["llama", "bert"],
        compile=["llama"],
        merge=NON_LINEAR,
    ),
    Row(
        "mlp-6-16-3",
        dh.LowRankAdapter(targets=["0", "1", "2"], reduction_factor=2),
        merge=NON_LINEAR,
    ),
    *_per_model(
        {name: t for name, t in PARALLEL_TARGETS.items() if name != "vit"},
        lambda t: dh.ParallelAdapter(targets=t, bottleneck=4),
        checkpointing=["llama", "bert"],
        compile=["llama"],
        merge=NON_LINEAR,
    ),
    # on ViT's batch some adapter tensors get no gradient on the second step either
    Row(
        "vit",
        dh.ParallelAdapter(targets=PARALLEL_TARGETS["vit"], bottleneck=4),
        every_grad=False,
        merge=NON_LINEAR,
    ),
    Row("mlp-6-8-3", dh.ParallelAdapter(targets=["0", "1", "2"], bottleneck=2), merge=NON_LINEAR),
    *_per_model(
        COMPACTER_TARGETS,
        lambda t: dh.Compacter(targets=t, reduction_factor=8),
        checkpointing=["llama", "bert"],
        compile=["llama"],
        merge=NON_LINEAR,
    ),
    *[
        Row(
            "mlp-6-6-6",  # 6 wide: not divisible by phm_dim=4, padded to 8
            dh.Compacter(targets=nn.Linear, reduction_factor=2, shared_phm_rule=shared),
            variant,
            merge=NON_LINEAR,
        )
        for shared, variant in [(True, "shared"), (False, "per-layer")]
    ],
    Row("llama", dh.Adapter(targets=["o_proj", "down_proj"], bottleneck=4), merge=NON_LINEAR),
    Row("mlp-6-8-3", dh.Adapter(targets=nn.Linear, bottleneck=2), merge=NON_LINEAR),
]

# ---------------------------------------------------------------- the rest
OTHERS = [
    Row("full-net", dh.Full(targets=["1"]), merge=True),
    Row(
        "llama",
        dh.ReFT(targets=r"re:model\.layers\.\d+", positions="f2+l2", init="identity"),
        merge="token positions",
    ),
    check_only(
        "llama", dh.ReFT(targets=r"re:model\.layers\.\d+"), "default", merge="token positions"
    ),
    # a prompt or a prefix changes what attention sees from the start: only disabled is the
    # base model.
    Row(
        "llama",
        dh.PromptTuning(num_tokens=4),
        identity=False,
        merge="prompt is part of the input",
    ),
    Row(
        "llama",
        dh.PrefixTuning(num_tokens=4, hidden=8),
        identity=False,
        merge="extra keys and values",
    ),
]

# How many trainable numbers each lifecycle row's delta holds. Counted by hand, e.g. LoRA
# r=4 on every Linear of tiny Llama: 2 layers × (q 256 + k 192 + v 192 + o 256 + gate 320
# + up 320 + down 320) = 3712; IA3 there: 2 × (k 16 + v 16 + down's input 48) = 160.
TRAINABLE = {
    "lora-gpt2": 2820,
    "lora-llama": 3712,
    "lora-gpt2-dora-random": 1890,
    "lora-llama-dora-random": 928,
    "lora-gpt2-pissa": 2304,
    "lora-gpt2-olora": 2304,
    "lora-llama-pissa": 1536,
    "lora-llama-olora": 1536,
    "lora-mixtral-experts": 7424,
    "lora-experts": 82,
    "loha-gpt2": 4608,
    "loha-llama": 2688,
    "loha-vit": 1920,
    "loha-loha-net": 244,
    "lokr-gpt2": 304,
    "lokr-llama": 308,
    "lokr-vit": 596,
    "lokr-lokr-net": 53,
    "ia3-gpt2": 448,
    "ia3-llama": 160,
    "ia3-bert": 288,
    "ia3-t5": 576,
    "ia3-vit": 256,
    "ia3-opt": 224,
    "ia3-ia3-net": 32,
    "bitfit-gpt2": 736,
    "bitfit-llama": 480,
    "bitfit-bert": 611,
    "bitfit-t5": 576,
    "bitfit-vit": 611,
    "bitfit-opt": 576,
    "bitfit-bitfit-net": 29,
    "ln_tuning-gpt2": 320,
    "ln_tuning-llama": 160,
    "ln_tuning-bert": 320,
    "ln_tuning-t5": 384,
    "ln_tuning-vit": 320,
    "ln_tuning-opt": 320,
    "ln_tuning-norm-net": 34,
    "vera-gpt2": 320,
    "vera-llama": 256,
    "vera-bert": 288,
    "vera-t5": 480,
    "vera-vit": 192,
    "vera-opt": 192,
    "vera-vera-net-saved-projection": 41,
    "vera-vera-net-seeded-projection": 41,
    "adalora-gpt2": 2320,
    "adalora-llama": 1560,
    "adalora-bert": 1688,
    "adalora-t5": 2856,
    "adalora-vit": 1168,
    "adalora-opt": 1168,
    "adalora-adalora-net": 126,
    "oft-gpt2": 5456,
    "oft-llama": 3584,
    "oft-bert": 4080,
    "oft-vit": 6064,
    "oft-oft-net": 29,
    "boft-gpt2": 2816,
    "boft-llama": 1952,
    "boft-vit": 2976,
    "boft-boft-net": 215,
    "low_rank_adapter-gpt2": 360,
    "low_rank_adapter-llama": 720,
    "low_rank_adapter-bert": 900,
    "low_rank_adapter-t5": 720,
    "low_rank_adapter-vit": 720,
    "low_rank_adapter-opt": 720,
    "low_rank_adapter-mlp-6-16-3": 156,
    "parallel_adapter-gpt2": 584,
    "parallel_adapter-llama": 1168,
    "parallel_adapter-bert": 1296,
    "parallel_adapter-t5": 1168,
    "parallel_adapter-opt": 1296,
    "parallel_adapter-vit": 1296,
    "parallel_adapter-mlp-6-8-3": 107,
    "compacter-gpt2": 280,
    "compacter-llama": 496,
    "compacter-bert": 604,
    "compacter-t5": 496,
    "compacter-vit": 496,
    "compacter-opt": 496,
    "compacter-mlp-6-6-6-shared": 132,
    "compacter-mlp-6-6-6-per-layer": 324,
    "adapter-llama": 1168,
    "adapter-mlp-6-8-3": 59,
    "full-full-net": 38,
    "reft-llama": 520,
    "prompt_tuning-llama": 128,
    "prefix_tuning-llama": 776,
}

ROWS: list[Row] = [
    replace(row, params=TRAINABLE.get(row.id))
    for row in [*LORA, *LYCORIS, *VECTORS, *SCALED_PROJECTIONS, *ORTHOGONAL, *ADAPTERS, *OTHERS]
]
