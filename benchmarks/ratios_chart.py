"""Draw the speed/memory ratios of the result tables against their goals, as one PNG.

Why: the README shows where we stand at a glance; the numbers come from the markdown
tables the benchmarks wrote (``benchmarks/results/*.md`` by default), never typed in.

Usage:
    python benchmarks/ratios_chart.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLES = {  # table -> how its rows are labelled
    "lora_vs_peft.md": "",
    "lora_vs_peft_dropout.md": "dropout 0.05: ",
    "compiled_vs_peft.md": "",
}


def read_rows(path: Path, label: str = "") -> list[tuple[str, float, float]]:
    """(label + figure, ratio, goal) for every row of a results table that has a goal."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[4].startswith("<="):
            continue
        rows.append((label + cells[0], float(cells[3]), float(cells[4].removeprefix("<=").strip())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        row
        for name, label in TABLES.items()
        if (args.results / name).exists()
        for row in read_rows(args.results / name, label)
    ]
    names = [name for name, _, _ in rows]
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) + 1.4))
    colours = ["tab:green" if ratio <= goal else "tab:red" for _, ratio, goal in rows]
    ax.barh(names, [ratio for _, ratio, _ in rows], color=colours)
    for index, (_, ratio, goal) in enumerate(rows):
        ax.plot([goal, goal], [index - 0.4, index + 0.4], color="black", linewidth=2)
        ax.text(
            max(ratio, goal) + 0.02,
            index,
            f"{ratio:.3f} (goal ≤ {goal:.2f})",
            va="center",
            fontsize=9,
        )
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlim(0, 1.45)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (lower is better); black tick = goal; green = met, red = not met")
    ax.set_title("deltahooks vs PEFT / frozen base, same process, interleaved")
    fig.tight_layout()
    out = args.results / "ratios.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
