"""Stateful fuzzing of the delta lifecycle (hypothesis RuleBasedStateMachine).

Random models (module trees, tiny GPT-2 and Llama) go through random sequences of
attach, detach, merge, unmerge, disable/enable, train, save/load, dtype round trips,
deepcopy, state_dict round trips and operations that must fail. After every step:

- with no delta attached the model equals the original bit-for-bit;
- the output equals a reference computed independently: a pristine copy of the base
  model whose weights the test edits by hand (Full copies replace, LoRA adds s·BA);
- every failed operation left the model exactly as it was.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot
from strategies import adaptable_paths, build
from strategies import blueprint as blueprints
from torch import nn

import deltahooks as dh

NAMES = ["a", "b", "c"]
HAND_WRITTEN = {"lora", "full", "adapter"}  # the reference spells these out itself
OTHER_METHODS = {  # small hyperparameters: tree leaves can be 1 wide
    "pissa": lambda paths: dh.LoRA(targets=paths, r=1, alpha=2.0, init="pissa"),
    "dora": lambda paths: dh.LoRA(targets=paths, r=1, alpha=2.0, dora=True, init="random"),
    "compacter": lambda paths: dh.Compacter(targets=paths, reduction_factor=2, phm_dim=2),
    "low_rank_adapter": lambda paths: dh.LowRankAdapter(targets=paths, reduction_factor=2),
    "parallel_adapter": lambda paths: dh.ParallelAdapter(targets=paths, bottleneck=1, scale=0.5),
    "reft": lambda paths: dh.ReFT(targets=paths, rank=1, positions="f1+l1"),
    "bitfit": lambda paths: dh.BitFit(targets=paths),
    "boft": lambda paths: dh.BOFT(targets=paths),
    "ia3": lambda paths: dh.IA3(targets=paths, feedforward=[paths[0]]),
    "ia3_output": lambda paths: dh.IA3(targets=paths),
    "lntuning": lambda paths: dh.LNTuning(),  # every norm (none in the random trees)
    "oft": lambda paths: dh.OFT(targets=paths),
    "loha": lambda paths: dh.LoHa(targets=paths, r=1),
    "lokr": lambda paths: dh.LoKr(targets=paths, r=1, decompose_both=True),
    "prompt": lambda paths: dh.PromptTuning(num_tokens=2),  # transformers models only
    "prefix": lambda paths: dh.PrefixTuning(num_tokens=2, reparameterize=False),
    "adalora": lambda paths: dh.AdaLoRA(targets=paths, init_r=2, target_r=1, total_step=9),
    "vera": lambda paths: dh.VeRA(targets=paths, r=2, save_projection=False),
    "lora_parameters": lambda paths: dh.LoRA(
        targets=dh.Paths([f"{path}.weight" for path in paths]), r=1, init="random"
    ),
}


def reads_weight(spec) -> bool:
    """DoRA and PiSSA compute from the layer's weight itself (its norm, its SVD). The
    reference folds a hand-written LoRA into the weight, where the model adds it on the
    output, so those two never share a layer with a hand-written LoRA here (what stacking
    them on one layer means is tested in tests/methods)."""
    options = spec.hyperparameters()
    return spec.method == "lora" and bool(options.get("dora") or options.get("init") == "pissa")


TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 0.1}


def tiny_transformer(kind: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=16
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=31,
            max_position_embeddings=16,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.eval(), torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode output (no dropout), leaving the model in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    return out.logits if hasattr(out, "logits") else out


def untied(module: nn.Module, attr: str) -> torch.Tensor:
    """Give the reference module its own copy of a tensor, so editing it edits nothing else."""
    tensor = getattr(module, attr)
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor.detach().clone()))
    else:
        module._buffers[attr] = tensor.clone()
    return getattr(module, attr)


def lora_update(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s-free B·A in the layout of ``module.weight``, in float64, from the LoRA paper."""
    a, b = a.double(), b.double()
    if isinstance(module, nn.Embedding):
        return (b @ a).T
    if isinstance(module, nn.Linear):
        return b @ a
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (b.flatten(1) @ a.flatten(1)).view(module.weight.shape)
    return (b @ a).T  # transformers Conv1D stores (fan_in, fan_out)


def assert_matches(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """``got`` ≈ ``want`` relative to want's size; NaN and ±Inf must sit at the same places.

    Both sides diverging the same way is agreement; a NaN or Inf on one side only is not.
    """
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), "NaN on one side only"
    infinite = got.isinf() | want.isinf()
    assert torch.equal(got[infinite], want[infinite]), "Inf on one side only, or of other sign"
    finite = got.isfinite() & want.isfinite()
    if finite.any():
        scale = 1 + want[finite].abs().max().item()
        diff = (got[finite] - want[finite]).abs().max().item()
        assert diff <= tolerance * scale, f"output differs from reference by {diff}"


class Lifecycle(RuleBasedStateMachine):
    @initialize(
        source=st.one_of(
            st.tuples(
                st.just("tree"),
                blueprints,
                st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
                st.integers(1, 5),
            ),
            st.tuples(
                st.sampled_from(["gpt2", "llama"]), st.none(), st.just(torch.float32), st.none()
            ),
        ),
        seed=st.integers(0, 1000),
    )
    def start(self, source, seed):
        kind, bp, dtype, in_dim = source
        if kind == "tree":
            self.model = build(bp, in_dim, dtype, seed).eval()
            self.x = torch.randn(2, in_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
        else:
            self.model, self.x = tiny_transformer(kind, seed)
        self.dtype = dtype
        self.pristine = copy.deepcopy(self.model)
        self.original = snapshot(self.model)
        self.identity = True  # False after a deepcopy: objects are new, values must match
        self.paths = adaptable_paths(self.model) + [
            p for p, m in self.model.named_modules() if type(m).__name__ == "Conv1D"
        ]
        self.specs: dict[str, list] = {}
        self.detached: list[dh.Delta] = []
        self.tmp = tempfile.mkdtemp()

    # ------------------------------------------------------------ helpers
    def layers_of(self, which) -> set[str]:
        """Paths that attached deltas adapt with a spec for which ``which(spec)`` holds."""
        found = set()
        for name, delta in self.attached().items():
            for view in delta.parts:
                if which(self.specs[name][view.spec_index]):
                    found.add(view.path)
        return found

    def attached(self) -> dict[str, dh.Delta]:
        return dh.deltas(self.model)

    def reference(self, deltas) -> torch.Tensor:
        """The output the model must give with ``deltas`` (enabled ones), built from scratch.

        LoRA, Full and Adapter are written out by hand from their papers (weights edited,
        plain hooks). Every other method is attached fresh to the pristine copy, in attach
        order, with the same tensors: an oracle for the lifecycle (merges, toggles, copies,
        files and dtype trips must not change what a delta computes), while each method's
        own math is checked against its formula in tests/methods.
        """
        ref = copy.deepcopy(self.pristine)
        updates = []
        later = []  # (kind, ...) in attach order: hand-written hooks and fresh attaches
        with torch.no_grad():
            for name, delta in deltas.items():
                if not delta.enabled:
                    continue
                state = delta.state_dict()
                for index, spec in enumerate(self.specs[name]):
                    views = [v for v in delta.parts if v.spec_index == index]
                    on_parameters = any(v.target != v.path for v in views)  # LoRA on W itself
                    if spec.method not in HAND_WRITTEN or reads_weight(spec) or on_parameters:
                        later.append(("attach", f"{name}_{index}", spec, state))
                        continue
                    for view in views:
                        path = view.path
                        if spec.method == "full":
                            for key, value in view.tensors.items():
                                owner, _, attr = key.rpartition(".")
                                untied(ref.get_submodule(owner), attr).copy_(value)
                        elif spec.method == "adapter":
                            tensors = [
                                state[f"{path}.adapter_{k}"]
                                for k in ("down", "down_bias", "up", "up_bias")
                            ]
                            later.append(("adapter", path, tensors, spec.activation, spec.scale))
                        else:
                            a, b = state[f"{path}.lora_A"], state[f"{path}.lora_B"]
                            r = a.shape[0]
                            scale = spec.alpha / math.sqrt(r) if spec.rslora else spec.alpha / r
                            updates.append((path, a, b, scale))
            for path, a, b, scale in updates:  # Full copies first, then additive updates
                module = ref.get_submodule(path)
                weight = untied(module, "weight")
                weight.copy_((weight.double() + scale * lora_update(module, a, b)).to(weight.dtype))
        for kind, *rest in later:  # after every weight edit, in attach order
            if kind == "attach":
                name, spec, state = rest
                dh.attach(ref, spec, name=name).load_state_dict(state, strict=False)
                continue
            path, (down, down_bias, up, up_bias), activation, scale = rest
            act = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}[activation]

            def bottleneck(
                module, args, out, down=down, db=down_bias, up=up, ub=up_bias, act=act, s=scale
            ):
                return out + s * (act(out @ down.T + db) @ up.T + ub)

            ref.get_submodule(path).register_forward_hook(bottleneck)
        return run(ref, self.x)

    def assert_close_to_reference(self, got: torch.Tensor, deltas) -> None:
        assert_matches(got, self.reference(deltas), TOLERANCE[self.dtype])

    def unchanged_by(self, action, *errors):
        """Run an action that may fail; if it fails, the model must be exactly as before."""
        before = snapshot(self.model)
        output = run(self.model, self.x)
        try:
            action()
        except errors:
            assert_restored(self.model, before)
            assert_outputs_equal(run(self.model, self.x), output)
            return False
        return True

    # -------------------------------------------------------------- rules
    @rule(
        name=st.sampled_from(NAMES),
        methods=st.sampled_from(["lora", "full", "both", "adapter"]),
        data=st.data(),
        r=st.integers(1, 3),
        rslora=st.booleans(),
    )
    def attach(self, name, methods, data, r, rslora):
        specs = []
        if methods in ("lora", "both"):
            chosen = data.draw(st.lists(st.sampled_from(self.paths), min_size=1, unique=True))
            if set(chosen) & self.layers_of(reads_weight):
                return  # see reads_weight: the oracle edits weights for LoRA
            specs.append(
                dh.LoRA(targets=dh.Paths(chosen), r=r, alpha=2.0, rslora=rslora, init="random")
            )
        if methods in ("full", "both"):
            specs.append(dh.Full(targets=dh.Paths([data.draw(st.sampled_from(self.paths))])))
        if methods == "adapter":
            chosen = data.draw(
                st.lists(st.sampled_from(self.paths), min_size=1, max_size=2, unique=True)
            )
            activation = data.draw(st.sampled_from(["relu", "gelu", "tanh", "silu"]))
            specs.append(
                dh.Adapter(
                    targets=dh.Paths(chosen),
                    bottleneck=r,
                    activation=activation,
                    scale=0.5,
                    init="random",
                )
            )
        if self.unchanged_by(lambda: dh.attach(self.model, specs, name=name), dh.DeltaError):
            self.specs[name] = specs

    @rule(
        name=st.sampled_from(NAMES),
        method=st.sampled_from(sorted(OTHER_METHODS)),
        data=st.data(),
        seed=st.integers(0, 1000),
    )
    def attach_other(self, name, method, data, seed):
        """Any other method, its tensors set to random values so it changes the output."""
        chosen = data.draw(
            st.lists(st.sampled_from(self.paths), min_size=1, max_size=2, unique=True)
        )
        spec = OTHER_METHODS[method](dh.Paths(chosen))
        if reads_weight(spec) and set(chosen) & self.layers_of(lambda s: s.method == "lora"):
            return
        delta = []
        if self.unchanged_by(
            lambda: delta.append(dh.attach(self.model, spec, name=name)), dh.DeltaError
        ):
            self.specs[name] = [spec]
            generator = torch.Generator().manual_seed(seed)
            state = delta[0].state_dict()
            noise = {
                key: (torch.randn(value.shape, generator=generator) * 0.3).to(value.dtype)
                for key, value in state.items()
                if value.is_floating_point()
            }
            delta[0].load_state_dict(noise, strict=False)

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def detach_one(self, data):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        if self.unchanged_by(delta.detach, dh.DeltaStateError):
            self.detached.append(delta)

    @rule()
    def detach_all(self):
        self.detached.extend(self.attached().values())
        dh.detach(self.model)
        assert self.attached() == {}

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def merge(self, data):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        self.unchanged_by(delta.merge, dh.DeltaStateError, NotImplementedError)

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def unmerge(self, data):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        self.unchanged_by(delta.unmerge, dh.DeltaStateError)

    @precondition(lambda self: self.attached())
    @rule(data=st.data(), enabled=st.booleans())
    def toggle(self, data, enabled):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        self.unchanged_by(delta.enable if enabled else delta.disable, dh.DeltaStateError)

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def disabled_block(self, data):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        base_like = {n: d for n, d in self.attached().items() if d is not delta}
        try:
            with delta.disabled():
                self.assert_close_to_reference(run(self.model, self.x), base_like)
        except dh.DeltaStateError:
            pass  # e.g. merged under another delta: the refusal is checked by unchanged_by elsewhere

    @rule()
    def train_step(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.attached() or not params:
            return
        merged = any(d.merged for d in self.attached().values())
        self.model.train()
        try:
            out = self.model(self.x)
            out = out.logits if hasattr(out, "logits") else out
            if not out.requires_grad:
                return  # every delta is disabled: nothing to train
            out.double().pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # keep training finite
            torch.optim.SGD(params, lr=0.01).step()
            assert not merged or not any(
                d.merged and d.enabled for d in self.attached().values()
            ), "training while merged must raise"
        except dh.DeltaStateError:
            assert merged
        finally:
            for p in params:
                p.grad = None
            self.model.eval()

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def save_and_load_into_a_fresh_copy(self, data):
        delta = data.draw(st.sampled_from(list(self.attached().values())))
        path = os.path.join(self.tmp, f"{delta.name}.safetensors")
        delta.save(path)
        fresh = copy.deepcopy(self.pristine)
        loaded = dh.load(fresh, path)
        assert list(loaded.state_dict()) == list(delta.state_dict())
        ref_specs = {delta.name: loaded}
        self.specs.setdefault(delta.name, self.specs[delta.name])
        assert_matches(run(fresh, self.x), self.reference(ref_specs), TOLERANCE[self.dtype])

    @rule()
    def dtype_round_trip(self):
        self.model.to(torch.float64)
        self.model.to(self.dtype)
        self.identity = False  # parameters keep their objects, buffers get new ones

    @rule()
    def deepcopy_model(self):
        self.model = copy.deepcopy(self.model)
        self.identity = False

    @rule()
    def state_dict_round_trip(self):
        before = run(self.model, self.x)
        self.model.load_state_dict(self.model.state_dict())
        assert_outputs_equal(run(self.model, self.x), before)

    @rule(which=st.sampled_from(["bad target", "bad module", "detached", "merge in training"]))
    def failing_operation(self, which):
        if which == "bad target":
            self.unchanged_by(
                lambda: dh.attach(self.model, dh.LoRA(targets=["no_such_module"]), name="zz"),
                dh.TargetError,
            )
        elif which == "bad module":
            self.unchanged_by(
                lambda: dh.attach(self.model, dh.LoRA(targets=dh.Paths([""])), name="zz"),
                dh.UnsupportedModuleError,
            )
        elif which == "detached" and self.detached:
            self.unchanged_by(self.detached[-1].merge, dh.DeltaStateError)
        elif which == "merge in training" and self.attached():
            delta = next(iter(self.attached().values()))
            self.model.train()
            try:
                if not delta.merged:
                    self.unchanged_by(delta.merge, dh.DeltaStateError, NotImplementedError)
                    assert not delta.merged
            finally:
                self.model.eval()

    # ---------------------------------------------------------- invariants
    @invariant()
    def matches_reference_or_original(self):
        if not hasattr(self, "model"):
            return
        deltas = self.attached()
        if not deltas:
            if self.identity:
                assert_restored(self.model, self.original)
            else:
                now = snapshot(self.model)
                assert now.keys == self.original.keys and now.classes == self.original.classes
                assert (
                    now.hooks == self.original.hooks and now.attributes == self.original.attributes
                )
                for key in now.keys:
                    assert torch.equal(now.values[key], self.original.values[key])
            return
        for name, param in self.model.named_parameters():
            assert param.requires_grad == ("dh__" in name), name
        self.assert_close_to_reference(run(self.model, self.x), deltas)


Lifecycle.TestCase.settings = settings(
    settings.default, stateful_step_count=12, max_examples=settings.default.max_examples * 5
)
TestLifecycle = Lifecycle.TestCase


@pytest.mark.parametrize(
    "got, want, agrees",
    [
        ([1.0, float("nan")], [1.0, float("nan")], True),  # both diverged the same way
        ([1.0, float("inf")], [1.0, float("inf")], True),
        ([1.0, float("nan")], [1.0, 2.0], False),  # a NaN on one side only
        ([1.0, 2.0], [1.0, float("nan")], False),
        ([1.0, float("inf")], [1.0, float("-inf")], False),
        ([1.0, 5.0], [1.0, 2.0], False),
        ([float("nan")] * 2, [float("nan")] * 2, True),
    ],
)
def test_the_reference_comparison_is_nan_aware(got, want, agrees):
    """The invariant above must not pass by comparing NaN to anything (0 <= tol * nan)."""
    if agrees:
        assert_matches(torch.tensor(got), torch.tensor(want), 1e-3)
    else:
        with pytest.raises(AssertionError):
            assert_matches(torch.tensor(got), torch.tensor(want), 1e-3)
