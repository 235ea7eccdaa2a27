"""Benchmarks: deltahooks against PEFT in one process, interleaved; quality on a real model.

``python -m benchmarks --method all|lora|ia3|...`` runs the comparisons listed in
:mod:`benchmarks.methods` (one table: method -> our spec, PEFT's config, how both get the
same values, what is measured); ``python -m benchmarks.quality`` trains MiniLM-L6 with
each method. Not tests: CI times nothing. See ``benchmarks/README.md``.
"""
