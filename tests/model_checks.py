"""Snapshots of everything detach promises to restore, and the assertion that it did."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class Snapshot:
    keys: list[str]
    values: dict[str, torch.Tensor]
    params: dict[str, list[tuple[str, object, bool]]]
    buffers: dict[str, list[tuple[str, object]]]
    classes: dict[str, type]
    attributes: dict[str, set[str]]
    hooks: dict[str, dict[str, list]]


def snapshot(model: nn.Module) -> Snapshot:
    state = model.state_dict()
    modules = dict(model.named_modules(remove_duplicate=False))
    return Snapshot(
        keys=list(state),
        values={k: v.detach().clone() for k, v in state.items()},
        params={
            path: [
                (n, p, p.requires_grad if p is not None else None) for n, p in m._parameters.items()
            ]
            for path, m in modules.items()
        },
        buffers={path: list(m._buffers.items()) for path, m in modules.items()},
        classes={path: type(m) for path, m in modules.items()},
        attributes={path: set(m.__dict__) for path, m in modules.items()},
        hooks={
            path: {name: list(getattr(m, name, {}).keys()) for name in HOOK_DICTS}
            for path, m in modules.items()
        },
    )


def assert_restored(model: nn.Module, before: Snapshot, *, same_hook_ids: bool = True) -> None:
    """The model is bit-for-bit, object-for-object what ``before`` recorded.

    ``same_hook_ids=False`` compares how many hooks of each kind each module has instead
    (unmerge re-registers a delta's hooks, which merge had taken away, under new ids).
    """
    after = snapshot(model)
    assert after.keys == before.keys, "state_dict keys or their order changed"
    for key in before.keys:
        a, b = before.values[key], after.values[key]
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, key
        if a.is_meta:
            continue  # meta tensors have no values to compare
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")
    assert after.classes == before.classes, "module classes changed"
    for path, entries in before.params.items():
        now = after.params[path]
        assert [n for n, _, _ in now] == [n for n, _, _ in entries], f"{path} parameter names"
        for (name, obj, flag), (_, obj2, flag2) in zip(entries, now):
            assert obj is obj2, f"{path}.{name} is a different Parameter object"
            assert flag == flag2, f"{path}.{name} requires_grad changed"
    for path, entries in before.buffers.items():
        now = after.buffers[path]
        assert [n for n, _ in now] == [n for n, _ in entries], f"{path} buffer names"
        for (name, obj), (_, obj2) in zip(entries, now):
            assert obj is obj2, f"{path}.{name} is a different buffer object"
    assert after.attributes == before.attributes, "module attributes were added or removed"
    if same_hook_ids:
        assert after.hooks == before.hooks, "hooks were left behind or removed"
    else:
        count = lambda hooks: {p: {k: len(v) for k, v in h.items()} for p, h in hooks.items()}  # noqa: E731
        assert count(after.hooks) == count(before.hooks), "hooks were left behind or removed"


def assert_outputs_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit-exact
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            assert_outputs_equal(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_outputs_equal(a[k], b[k])
