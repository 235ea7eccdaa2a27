"""The ``deltahooks`` command: ``demo`` and ``info``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltahooks`` console script.

    Example:
        >>> import os, tempfile, torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
        >>> dh.attach(model, dh.LoRA(targets=["0"], r=2)).save(path)
        >>> main(["info", path])  # doctest: +ELLIPSIS
        /...lora.safetensors: delta 'default', 16 values, ... bytes
          lora {...} on 1 modules
        0
    """
    parser = argparse.ArgumentParser(prog="deltahooks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="describe a saved delta file")
    info.add_argument("path")
    demo = commands.add_parser("demo", help="fine-tune a real pretrained model on CPU")
    demo.add_argument("--epochs", type=float, default=2.0, help="passes over the training words")
    demo.add_argument("--method", choices=["lora", "full", "head"], default="lora")
    demo.add_argument("--output", default="demo-delta.safetensors", help="where to save the delta")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .io import describe_file

        print(describe_file(args.path))
        return 0
    from .demo import run_demo

    return run_demo(epochs=args.epochs, method=args.method, output=args.output, seed=args.seed)
