"""Target syntax: every form selects what it says, and a miss names the closest modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltahooks as dh
from deltahooks.targets import resolve_targets


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.k_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(4, 10)


def paths(model, targets, exclude=None):
    return [p for p, _ in resolve_targets(model, targets, exclude)]


def test_suffix_matches_on_dot_boundary_only():
    model = Tiny()
    assert paths(model, "q_proj") == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert paths(model, "self_attn.q_proj") == paths(model, "q_proj")
    assert paths(model, "layers.1.self_attn.q_proj") == ["layers.1.self_attn.q_proj"]
    with pytest.raises(dh.TargetError):
        paths(model, "proj")  # not a whole name component


def test_list_is_union_in_module_order():
    assert paths(Tiny(), ["v_proj", "q_proj"]) == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]


def test_module_objects_target_exactly_those_modules():
    model = Tiny()
    block = model.layers[1]
    assert paths(model, block.self_attn.k_proj) == ["layers.1.self_attn.k_proj"]
    assert paths(model, [block.mlp[2], model.layers[0].self_attn.q_proj]) == [
        "layers.0.self_attn.q_proj",
        "layers.1.mlp.2",
    ]
    assert paths(model, block.mlp) == ["layers.1.mlp"]  # the container itself, not its children
    assert paths(model, nn.Linear, exclude=[model.lm_head, "layers.1.*"]) == paths(
        model, "re:layers\\.0\\..*(proj|mlp\\.[02])"
    )
    delta = dh.attach(model, dh.LoRA(targets=[block.self_attn.q_proj], r=2, init="random"))
    assert delta.paths == ["layers.1.self_attn.q_proj"]
    x = torch.randn(1, 4)
    with delta.disabled():
        base = block.self_attn.q_proj(x)
    assert not torch.equal(block.self_attn.q_proj(x), base)


def test_glob_regex_type_callable_and_paths():
    model = Tiny()
    assert paths(model, "layers.*.mlp.*") == [
        "layers.0.mlp.0",
        "layers.0.mlp.1",
        "layers.0.mlp.2",
        "layers.1.mlp.0",
        "layers.1.mlp.1",
        "layers.1.mlp.2",
    ]
    assert paths(model, r"re:layers\.0\..*_proj") == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.k_proj",
        "layers.0.self_attn.v_proj",
    ]
    assert paths(model, nn.Embedding) == ["embed"]
    assert paths(model, lambda p, m: p.endswith("k_proj") and "1" in p) == [
        "layers.1.self_attn.k_proj"
    ]
    assert paths(model, dh.Paths(["lm_head", "embed"])) == ["embed", "lm_head"]


def test_all_linear_skips_the_output_head():
    model = Tiny()
    found = paths(model, "all-linear")
    assert "lm_head" not in found
    assert len(found) == 2 * (3 + 2)


def test_all_linear_prefers_hf_output_embeddings():
    model = Tiny()
    model.get_output_embeddings = lambda: model.layers[1].mlp[2]
    found = paths(model, "all-linear")
    assert "layers.1.mlp.2" not in found and "lm_head" in found


def test_exclude_removes_and_must_match():
    model = Tiny()
    assert paths(model, "q_proj", exclude="layers.0.self_attn.q_proj") == [
        "layers.1.self_attn.q_proj"
    ]
    with pytest.raises(dh.TargetError, match="removes every module"):
        paths(model, "q_proj", exclude=nn.Linear)
    with pytest.raises(dh.TargetError, match="exclude entry"):
        paths(model, "q_proj", exclude="nothing_like_this")


def test_a_miss_lists_the_closest_names():
    with pytest.raises(dh.TargetError) as err:
        paths(Tiny(), "q_prj")
    assert "layers.0.self_attn.q_proj" in str(err.value)
    with pytest.raises(dh.TargetError, match="'query'"):
        paths(Tiny(), ["q_proj", "query"])  # one entry of a list that matches nothing


def test_bad_forms_are_rejected_with_a_hint():
    with pytest.raises(dh.TargetError, match="regular expression"):
        paths(Tiny(), "re:(unclosed")
    with pytest.raises(dh.TargetError, match=r"not an nn\.Module subclass"):
        paths(Tiny(), int)
    with pytest.raises(dh.TargetError, match="cannot use"):
        paths(Tiny(), 3.5)


def test_attach_with_a_missing_target_changes_nothing():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dh.TargetError):
        dh.attach(model, dh.LoRA(targets=["q_proj", "nope"]))
    assert list(model.state_dict()) == list(before)
    assert all(p.requires_grad for p in model.parameters())
    assert dh.deltas(model) == {}
    assert not any(m._forward_hooks for m in model.modules())
    x = torch.tensor([[1, 2]])
    assert model.embed(x).shape == (1, 2, 4)
