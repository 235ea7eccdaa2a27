"""Quality on a real model: every method fine-tunes MiniLM-L6 on VADER word polarity under
one recipe (``python -m benchmarks.quality``; see ``__main__`` for the options).

``data`` is the task (model, fixed split), ``methods`` the rows (labels, rates, specs),
``train`` the runs (a fresh interpreter per method and seed, interleaved), ``report`` the
table, notes and chart.
"""
