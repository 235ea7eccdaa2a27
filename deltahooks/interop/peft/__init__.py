"""PEFT adapter directories, both ways: :func:`load_peft` attaches one as a delta,
:func:`save_peft` (and ``Delta.save_peft``) writes one that ``peft.PeftModel`` loads.

One file per method family holds both directions of its conversion (``lora.py`` with
``from_peft`` and ``to_peft``, ...) and registers them in :mod:`.registry` when imported,
which happens here; :mod:`.directory` reads and writes the files around them.
"""

from . import adalora, ia3, ln_tuning, lora, lycoris, oft, prompts, vera  # noqa: F401 (register)
from .directory import load_peft, save_peft

__all__ = ["load_peft", "save_peft"]
