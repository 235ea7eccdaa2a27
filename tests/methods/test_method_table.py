"""The bar every method meets, run for each row of the method table (tests/method_table.py)."""

from __future__ import annotations

import inspect

import pytest

import deltahooks as dh

transformers = pytest.importorskip("transformers")

import method_bar  # noqa: E402  (after the importorskip)
from method_table import ROWS, TRAINABLE, Row  # noqa: E402


def rows(**where) -> list:
    """``pytest.param`` per row whose fields have the given truthy-ness, named by its id."""
    chosen = [r for r in ROWS if all(bool(getattr(r, k)) == v for k, v in where.items())]
    return [pytest.param(r, id=r.id) for r in chosen]


def public_methods() -> set[str]:
    return {
        obj.method
        for name in dh.__all__
        if inspect.isclass(obj := getattr(dh, name))
        and issubclass(obj, dh.DeltaSpec)
        and obj is not dh.DeltaSpec
    }


def test_every_public_method_has_a_lifecycle_row_and_ids_are_unique():
    covered = {row.method for row in ROWS if row.lifecycle}
    assert public_methods() - covered == set(), "add a row to tests/method_table.py"
    uncounted = [row.id for row in ROWS if row.lifecycle and row.params is None]
    assert not uncounted, "add their trainable counts to TRAINABLE"
    assert set(TRAINABLE) <= {row.id for row in ROWS if row.lifecycle}, "a count of no row"
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("row", rows(lifecycle=True))
def test_identity_training_files_and_detach(row: Row, tmp_path):
    method_bar.check_identity_training_files_and_detach(
        row.make,
        row.spec,
        tmp_path,
        every_grad=row.every_grad,
        identity=row.identity,
        atol=row.atol,
        other_kernels=row.other_kernels,
        params=row.params,
    )


@pytest.mark.parametrize("row", rows(lifecycle=True, meta=True))
def test_the_meta_device_plan_holds_the_same_tensors(row: Row):
    method_bar.check_meta_plan(row.make, row.spec)


@pytest.mark.parametrize("row", [p for p in rows() if p.values[0].merge is True])
def test_merge_matches_the_hooked_outputs_and_unmerges_exactly(row: Row):
    method_bar.check_merge(row.make, row.spec)


@pytest.mark.parametrize("row", [p for p in rows() if isinstance(p.values[0].merge, str)])
def test_merge_is_refused_and_changes_nothing(row: Row):
    method_bar.check_merge_refused(row.make, row.spec, row.merge)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("row", rows(checkpointing=True))
def test_gradient_checkpointing(row: Row, use_reentrant):
    method_bar.check_gradient_checkpointing(row.make, row.spec, use_reentrant)


@pytest.mark.parametrize("row", rows(compile=True))
def test_compile_fullgraph(row: Row):
    method_bar.check_compile(row.make, row.spec)
