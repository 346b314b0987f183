"""Draw the measured figures of the docs from the small result files in docs/data/.

The measurements themselves come from runs that take minutes; their results are kept as small
JSON files so the pages and the charts read the same numbers:

- ``docs/data/latency.json``: ``python benchmarks/bench_latency.py --json docs/data/latency.json``
- ``docs/data/loss_curves.json``: ``python docs/scripts/loss_curves.py`` (every method, a short
  run each), or a ``deltatune compare`` run imported with
  ``python docs/scripts/figures.py --from-compare <its --output-dir>`` (which also keeps the
  table rows as ``docs/data/compare.json``).

Run: ``python docs/scripts/figures.py [--from-compare DIR]`` writes docs/img/latency.png,
docs/img/compare.png and docs/img/loss-curves.png from whichever data files exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1]
DATA = DOCS / "data"
IMG = DOCS / "img"


def import_compare(run_dir: str) -> None:
    """Copy a compare run's table and each method's training-loss curve into docs/data/."""
    rows = json.loads(Path(run_dir, "compare.json").read_text())
    curves: dict[str, dict[str, Any]] = {}
    for row in rows:
        metrics = Path(run_dir, row["method"], "metrics.jsonl")
        if not metrics.exists():
            continue
        points = []
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                points.append([record["step"], round(float(record["loss"]), 5)])
        curves[row["method"]] = {"loss": points, "accuracy_after": row.get("accuracy")}
    DATA.mkdir(exist_ok=True)
    (DATA / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    steps = max((r.get("steps", 0) for r in rows), default=0)
    (DATA / "loss_curves.json").write_text(json.dumps({"steps": steps, "methods": curves}, indent=1) + "\n")


def latency_markdown(data: dict[str, Any]) -> str:
    """The latency ratios as the Markdown table the checklist page shows."""
    shapes = list(data["ratio_to_base"])
    head = ["method"] + [f"{s} / base" for s in shapes]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(shapes)) + "|"]
    for method in data["ratio_to_base"][shapes[0]]:
        cells = [f"{data['ratio_to_base'][s][method]:.3f}" for s in shapes]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def compare_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as ``deltatune compare`` prints it."""
    from deltatune.train.compare import table

    return table(rows)


def latency_chart(data: dict[str, Any]) -> Path:
    shapes = list(data["ratio_to_base"])
    methods = [m for m in data["ratio_to_base"][shapes[0]] if m != "base"]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(methods) + 1.4))
    height = 0.8 / len(shapes)
    for i, shape in enumerate(shapes):
        values = [data["ratio_to_base"][shape][m] for m in methods]
        ys = [k + i * height for k in range(len(methods))]
        ax.barh(ys, values, height=height, label=f"batch x tokens {shape}", color=f"C{i}")
    ax.set_yticks([k + height * (len(shapes) - 1) / 2 for k in range(len(methods))], methods, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="#333333", linewidth=0.8)
    ax.set_xlabel("forward time / base model's (lower is better)")
    top = max(data["ratio_to_base"][s][m] for s in shapes for m in methods)
    ax.set_xlim(0.9, top + 0.05)
    ax.set_title(f"Inference latency per method\n{data['setup']}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right", framealpha=1.0)
    fig.tight_layout()
    out = IMG / "latency.png"
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


def compare_chart(rows: list[dict[str, Any]]) -> Path:
    from deltatune.train.compare import chart

    out = IMG / "compare.png"
    chart(rows, str(out))
    return out


def loss_chart(data: dict[str, Any]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, result) in enumerate(data["methods"].items()):
        points = result["loss"]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=method, color=f"C{i}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(
        f"Training loss per method: all-MiniLM-L6-v2, embedded fortunes data, {data['steps']} steps, seed 42",
        fontsize=9,
    )
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    out = IMG / "loss-curves.png"
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from-compare", default=None, help="a deltatune compare --output-dir to import first"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the tables the pages show")
    args = parser.parse_args()
    if args.from_compare:
        import_compare(args.from_compare)
    IMG.mkdir(exist_ok=True)
    if (DATA / "latency.json").exists():
        latency = json.loads((DATA / "latency.json").read_text())
        print(latency_chart(latency))
        if args.markdown:
            print(latency_markdown(latency))
    if (DATA / "compare.json").exists():
        rows = json.loads((DATA / "compare.json").read_text())
        print(compare_chart(rows))
        if args.markdown:
            print(compare_markdown(rows))
    if (DATA / "loss_curves.json").exists():
        print(loss_chart(json.loads((DATA / "loss_curves.json").read_text())))


if __name__ == "__main__":
    main()
