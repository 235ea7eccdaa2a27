"""The ``deltahooks`` command: one-line errors with exit status 2, --debug, --version, info."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import deltahooks as dh
from deltahooks.cli import main


def run(capsys, *argv):
    """``main(argv)`` in-process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, out, err):
    assert status == 2
    assert out == ""
    assert err.startswith("deltahooks: error: ")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err


def saved_delta(tmp_path, layers=3):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)], nn.Linear(4, 2))
    head = str(layers)
    delta = dh.attach(
        model, [dh.LoRA(targets=nn.Linear, exclude=head, r=2, alpha=4), dh.Full(targets=[head])]
    )
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    return str(path)


def test_missing_file_is_one_line_with_status_2(capsys, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    status, out, err = run(capsys, "info", missing)
    assert_one_line_error(status, out, err)
    assert "nope.safetensors" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(capsys, tmp_path, where):
    missing = str(tmp_path / "nope.safetensors")
    argv = ["--debug", "info", missing] if where == "before" else ["info", missing, "--debug"]
    with pytest.raises(dh.DeltaFileError, match=r"nope\.safetensors"):
        main(argv)


def test_a_text_file_is_not_a_delta(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a delta\n")
    assert_one_line_error(*run(capsys, "info", str(text)))


def test_a_directory_is_not_a_delta(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "info", str(tmp_path)))


def test_a_peft_directory_points_to_load_peft(capsys, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    status, out, err = run(capsys, "info", str(tmp_path))
    assert_one_line_error(status, out, err)
    assert "dh.load_peft" in err


def test_a_safetensors_file_without_delta_metadata_is_refused(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    status, out, err = run(capsys, "info", str(path))
    assert_one_line_error(status, out, err)
    assert "delta.save()" in err


def test_info_lists_the_module_paths_of_each_part(capsys, tmp_path):
    path = saved_delta(tmp_path)
    status, out, err = run(capsys, "info", path)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: delta 'default'")
    lora = next(i for i, line in enumerate(lines) if line.strip().startswith("lora "))
    assert "r=2" in lines[lora] and "alpha=4" in lines[lora]
    assert lines[lora].endswith("on 3 modules:")
    assert [line.strip() for line in lines[lora + 1 : lora + 4]] == ["0", "1", "2"]
    full = lines.index("  full on 1 module:")
    assert lines[full + 1].strip() == "3"


def test_info_shows_twenty_paths_and_counts_the_rest(capsys, tmp_path):
    path = saved_delta(tmp_path, layers=25)
    status, out, _ = run(capsys, "info", path)
    assert status == 0
    assert "on 25 modules:" in out
    assert "    19\n" in out and "    20\n" not in out
    assert "and 5 more" in out


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert out.strip() == f"deltahooks {dh.__version__}"


def test_python_m_deltahooks_version():
    root = os.path.dirname(os.path.dirname(os.path.abspath(dh.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "deltahooks", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"deltahooks {dh.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["demo", "--help"]])
def test_help_is_plain_text_with_examples(capsys, argv):
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "``" not in out and ":func:" not in out
    assert "deltahooks info" in out or "deltahooks demo" in out


def test_top_level_help_has_an_example_per_command(capsys):
    _, out, _ = run(capsys, "--help")
    examples = out.split("examples:")[1]
    assert "deltahooks demo" in examples and "deltahooks info" in examples


@pytest.mark.parametrize(
    "argv", [[], ["info"], ["frobnicate"], ["demo", "--epochs", "0"], ["demo", "--method", "x"]]
)
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert "usage: deltahooks" in err
    assert "Traceback" not in err
