"""dh.summary: merged and disabled deltas say so, and merged ones are not counted trainable."""

from torch import nn

import deltahooks as dh


def make_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def trainable_count(text):
    line = next(line for line in text.splitlines() if line.startswith("trainable:"))
    return int(line.split()[1].replace(",", ""))


def test_merged_delta_is_shown_merged_and_not_trainable():
    model = make_model().eval()
    delta = dh.attach(model, [dh.LoRA(targets=["0"], r=2), dh.Full(targets=["2"])])
    hooked = dh.summary(model)
    assert trainable_count(hooked) == 24 + 27  # LoRA 2×4 + 8×2, Full 8×3 + 3

    delta.merge()
    merged = dh.summary(model)
    assert "delta 'default' (enabled, merged)" in merged
    assert "0  lora  24 params (merged into the weights)" in merged
    assert "2  full  27 params (merged into the weights)" in merged
    assert trainable_count(merged) == 0
    assert "merged: 51 delta parameters folded into the weights (unmerge to train)" in merged

    delta.unmerge()
    again = dh.summary(model)
    assert again == hooked
    assert "merged" not in again.replace("unmerged", "")


def test_only_the_merged_delta_is_left_out_of_trainable():
    model = make_model().eval()
    kept = dh.attach(model, dh.LoRA(targets=["0"], r=2), name="kept")
    folded = dh.attach(model, dh.LoRA(targets=["2"], r=1), name="folded")
    folded.merge()
    text = dh.summary(model)
    assert "delta 'kept' (enabled, unmerged)" in text
    assert "delta 'folded' (enabled, merged)" in text
    assert trainable_count(text) == sum(p.numel() for p in kept.parameters()) == 24
    assert "merged: 11 delta parameters" in text  # 1×8 + 3×1
    assert "delta: 35" in text  # both deltas still sit on the model


def test_disabled_delta_says_so_on_its_header():
    model = make_model()
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
    with delta.disabled():
        text = dh.summary(model)
    assert "delta 'default' (disabled, unmerged)" in text
    assert "merged:" not in text
