"""The ``deltahooks`` command: ``demo``, ``info``, ``inspect``, ``merge`` and ``convert``.

Developer notes (users see ``DESCRIPTION`` and ``EPILOG`` instead of this docstring):

- :func:`main` returns the exit status and never raises ``SystemExit`` itself: 0 on
  success, 2 for a usage error (argparse's own message) or for any ``DeltaError`` /
  ``OSError`` a subcommand raises, printed as one line ``deltahooks: error: <message>``.
- ``--debug`` (before or after the subcommand) re-raises instead, with the traceback.
- Long work reports progress as ``deltahooks: ...`` lines on stderr; results go to stdout.
- Model folders are read offline (``deltahooks.checkpoint``); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .checkpoint import check_folder, is_demo, load_model, merge_checkpoint
from .demo import run_demo
from .errors import DeltaError, DeltaFileError
from .interop.peft import load_peft
from .io import describe_file
from .loading import load
from .preview import describe_targets
from .version import __version__

DESCRIPTION = """\
Parameter-efficient fine-tuning of PyTorch models through forward hooks.
Run a demo fine-tune, describe a delta file saved with delta.save(), see what
target patterns select in a model, merge a delta into a checkpoint, or convert
between delta files and PEFT adapter folders."""
EPILOG = """\
examples:
  deltahooks demo --method lora --epochs 2 --output demo-delta.safetensors
  deltahooks info demo-delta.safetensors
  deltahooks inspect my-llama/ --targets q_proj v_proj
  deltahooks merge my-llama/ lora.safetensors my-llama-merged/
  deltahooks convert --to-peft lora.safetensors my-adapter/ --model my-llama/
  deltahooks convert --from-peft my-adapter/ lora.safetensors --model my-llama/

MODEL is a local transformers checkpoint folder (config.json + safetensors, as
save_pretrained writes; nothing is downloaded), or 'minilm' for the demo's model.

An error prints one line and exits with status 2; add --debug (before or after
the command) to see its full traceback instead."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive, e.g. 2")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltahooks",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deltahooks {__version__}")
    debug = {"action": "store_true", "help": "show the full traceback of an error"}
    parser.add_argument("--debug", **debug)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser(
        "info",
        help="describe a saved delta file",
        description="Show a delta file's name, size, methods and hyperparameters, and the\n"
        "module paths each part adapts, without loading a model.",
        epilog="example:\n  deltahooks info lora.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("path", metavar="FILE", help="a .safetensors file written by delta.save()")
    demo = commands.add_parser(
        "demo",
        help="fine-tune a real pretrained model on CPU",
        description="Fine-tune MiniLM-L6 on word polarity (VADER lexicon) on CPU, then check\n"
        "that detach restores the model exactly and that the saved delta reloads.\n"
        "Needs: pip install 'deltahooks[demo]'",
        epilog="example:\n  deltahooks demo --method head --epochs 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--method",
        choices=["lora", "full", "head"],
        default="lora",
        help="lora: LoRA + trained classifier; head: classifier only; full: plain fine-tuning "
        "(default: lora)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_float,
        default=2.0,
        help="passes over the training words (default: 2)",
    )
    demo.add_argument(
        "--output",
        default="demo-delta.safetensors",
        metavar="FILE",
        help="where the delta goes (default: demo-delta.safetensors)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    subcommands = [info, demo, *_model_commands(commands)]
    for sub in subcommands:  # --debug after the subcommand too, without overriding the global
        sub.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return parser


MODEL_HELP = "a local transformers checkpoint folder, or 'minilm' for the demo's model"


def _model_commands(commands) -> list[argparse.ArgumentParser]:
    """The subcommands that read a model: inspect, merge, convert."""
    raw = argparse.RawDescriptionHelpFormatter
    inspect = commands.add_parser(
        "inspect",
        help="show a model's modules and what target patterns select",
        description="Print the module tree of a checkpoint with parameter counts (layers of a\n"
        "stack that print alike are shown once). With --targets, mark the modules the\n"
        "patterns select, as dh.attach(model, spec(targets=...)) would: a dry run that\n"
        "reads only config.json. A pattern that selects nothing is an error naming the\n"
        "closest modules.",
        epilog="examples:\n  deltahooks inspect my-llama/\n"
        "  deltahooks inspect my-llama/ --targets q_proj v_proj --exclude 'layers.0.*'\n"
        "  deltahooks inspect minilm --targets 're:.*attention.self.(query|value)'\n\n"
        "patterns: a name suffix (q_proj), a glob (layers.*.mlp.*), 're:<regex>' on the\n"
        "whole path, or all-linear (every linear layer but the output head)",
        formatter_class=raw,
    )
    inspect.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    inspect.add_argument(
        "--targets", nargs="+", metavar="PATTERN", help="target patterns (their union)"
    )
    inspect.add_argument(
        "--exclude", nargs="+", metavar="PATTERN", help="patterns removed from the selection"
    )
    merge = commands.add_parser(
        "merge",
        help="write a checkpoint with a delta merged into its weights",
        description="Load MODEL_DIR, attach DELTA (a delta.save() file) and merge it, then write\n"
        "OUT_DIR: the same safetensors files (shards and index alike) with the merged\n"
        "tensors in their stored dtype and all others unchanged, plus the config and\n"
        "tokenizer files. It loads with from_pretrained, without deltahooks. OUT_DIR\n"
        "must be new or empty, and appears only when complete. Methods that cannot\n"
        "merge (adapters, prompts) are refused. 'minilm' (the demo's model, whose\n"
        "classifier is new) is written with save_pretrained instead.",
        epilog="example:\n  deltahooks merge my-llama/ lora.safetensors my-llama-merged/",
        formatter_class=raw,
    )
    merge.add_argument("model", metavar="MODEL_DIR", help=MODEL_HELP)
    merge.add_argument("delta", metavar="DELTA", help="a .safetensors file written by delta.save()")
    merge.add_argument("out", metavar="OUT_DIR", help="the folder to write (new or empty)")
    merge.add_argument(
        "--dtype",
        choices=["float32", "auto"],
        default="float32",
        help="float32: merge in float32, then store in each tensor's own dtype; auto: load and "
        "merge in the checkpoint's dtype (half the memory for 16-bit models) (default: float32)",
    )
    convert = commands.add_parser(
        "convert",
        help="convert a delta file to a PEFT adapter folder, or back",
        description="--to-peft writes a delta.save() file as a PEFT adapter folder\n"
        "(adapter_config.json + adapter_model.safetensors) that\n"
        "peft.PeftModel.from_pretrained loads; --from-peft writes a PEFT adapter folder\n"
        "as a delta file. --model is the base model the adapter belongs to (needed to\n"
        "resolve its layers); tensors are read in float32.",
        epilog="examples:\n"
        "  deltahooks convert --to-peft lora.safetensors my-adapter/ --model my-llama/\n"
        "  deltahooks convert --from-peft my-adapter/ lora.safetensors --model my-llama/",
        formatter_class=raw,
    )
    way = convert.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-peft", nargs=2, metavar=("DELTA", "OUT_DIR"), help="delta file → PEFT")
    way.add_argument(
        "--from-peft", nargs=2, metavar=("DIR", "OUT.safetensors"), help="PEFT folder → delta file"
    )
    convert.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    convert.add_argument(
        "--task-type",
        metavar="TYPE",
        help="--to-peft: PEFT's task_type (CAUSAL_LM, SEQ_CLS, ...; default: none)",
    )
    convert.add_argument("--name", help="--from-peft: the delta's name (default: 'default')")
    return [inspect, merge, convert]


def _progress(message: str) -> None:
    print(f"deltahooks: {message}", file=sys.stderr, flush=True)


def _inspect(args: argparse.Namespace) -> int:
    if args.exclude and not args.targets:
        raise DeltaError("--exclude narrows --targets; give --targets PATTERN ... too")
    model = load_model(args.model, meta=True)

    def one(patterns: list[str] | None) -> str | list[str] | None:
        return patterns[0] if patterns and len(patterns) == 1 else patterns

    print(describe_targets(model, one(args.targets), one(args.exclude)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    source, out = args.to_peft or args.from_peft
    if not is_demo(args.model):
        check_folder(args.model)  # before the progress line: mistakes stay one line
    if not os.path.exists(source):
        raise DeltaFileError(f"{source!r} does not exist; name the file or folder to convert")
    _progress(f"loading {args.model}")
    model = load_model(args.model)
    if args.to_peft:
        delta = load(model, source)
        delta.save_peft(out, task_type=args.task_type)
    else:
        delta = load_peft(model, source, name=args.name)
        delta.save(out)
    _progress(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        print(describe_file(args.path))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model folders are local: never reach out
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "merge":
        merge_checkpoint(args.model, args.delta, args.out, dtype=args.dtype, progress=_progress)
        return 0
    if args.command == "convert":
        return _convert(args)
    try:
        return run_demo(epochs=args.epochs, method=args.method, output=args.output, seed=args.seed)
    except ModuleNotFoundError as err:
        raise DeltaError(
            f"the demo needs its extra packages ({err}); install them with "
            "pip install 'deltahooks[demo]'"
        ) from err


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltahooks`` console script; returns the exit status.

    Example:
        >>> import os, tempfile, torch, deltahooks as dh
        >>> from deltahooks.cli import main
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
        >>> dh.attach(model, dh.LoRA(targets=["0"], r=2)).save(path)
        >>> main(["info", path])  # doctest: +ELLIPSIS
        /...lora.safetensors: delta 'default', 16 values, ... bytes
          lora r=2 alpha=8.0 ... on 1 module:
            0
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors (already printed)
        return int(done.code or 0)
    try:
        return _run(args)
    except (DeltaError, OSError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"deltahooks: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("deltahooks: interrupted", file=sys.stderr)
        return 130
