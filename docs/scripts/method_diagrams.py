"""Draw where each method sits in a transformer block: one PNG per method under docs/img/.

Run: ``python docs/scripts/method_diagrams.py`` (a few seconds, matplotlib only). Grey boxes are
frozen, orange boxes are what the method trains, white boxes are operations without weights.
The decoder blocks are Llama's (pre-norm: RMSNorm before each sub-layer); the bottleneck
adapter figures use BERT's post-norm block, where Houlsby et al. placed their adapters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "img"
COLOURS = {"frozen": "#d9d9d9", "trained": "#f4a259", "op": "#ffffff", "io": "#eef3fb", "nf4": "#b8c4d6"}
ROW = 1.0  # vertical distance between rows
BOX_H = 0.56


@dataclass
class Box:
    """A box in a row: its label, its kind (a key of COLOURS) and an optional trained part beside it."""

    label: str
    kind: str = "frozen"
    extra: str = ""  # a small trained box attached on the right (LoRA's B·A, (IA)³'s l, ...)
    width: float = 1.5
    hatch: str = ""

    @property
    def extra_width(self) -> float:
        return max(0.55, 0.085 * len(self.extra) + 0.2) if self.extra else 0.0

    @property
    def full_width(self) -> float:
        return self.width + (0.06 + self.extra_width if self.extra else 0.0)


def draw_box(ax: Axes, x: float, y: float, box: Box) -> tuple[float, float]:
    """Draw ``box`` centred at (x, y); return the x extent it covers."""
    left = x - box.width / 2
    ax.add_patch(
        FancyBboxPatch(
            (left, y - BOX_H / 2),
            box.width,
            BOX_H,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=COLOURS[box.kind],
            edgecolor="#333333",
            linewidth=1.0,
            hatch=box.hatch,
        )
    )
    ax.text(x, y, box.label, ha="center", va="center", fontsize=8.5)
    right = left + box.width
    if box.extra:
        w = box.extra_width
        ax.add_patch(
            FancyBboxPatch(
                (right + 0.06, y - BOX_H / 2 + 0.06),
                w,
                BOX_H - 0.12,
                boxstyle="round,pad=0.02,rounding_size=0.06",
                facecolor=COLOURS["trained"],
                edgecolor="#333333",
                linewidth=1.0,
            )
        )
        ax.text(right + 0.06 + w / 2, y, box.extra, ha="center", va="center", fontsize=8)
        right += 0.06 + w
    return left, right


def arrow(
    ax: Axes, start: tuple[float, float], end: tuple[float, float], style: str = "-|>", **kw: object
) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=9, color=kw.pop("color", "#333333"), **kw
        )  # type: ignore[arg-type]
    )


def column(
    ax: Axes,
    rows: list[list[Box]],
    x: float = 0.0,
    residuals: tuple[tuple[int, int], ...] = (),
    title: str = "",
) -> None:
    """Rows from top to bottom, each centred on ``x``, arrows between consecutive rows, and
    residual connections (from row i's input to row j) drawn as lines on the left."""
    n = len(rows)
    ys = [(n - 1 - i) * ROW for i in range(n)]
    lefts = []
    for row, y in zip(rows, ys, strict=True):
        total = sum(b.full_width for b in row) + 0.25 * (len(row) - 1)
        cx = x - total / 2
        left = None
        for b in row:
            lo, _ = draw_box(ax, cx + b.width / 2, y, b)
            left = lo if left is None else min(left, lo)
            cx += b.full_width + 0.25
        lefts.append(left if left is not None else x)
    for i in range(n - 1):
        arrow(ax, (x, ys[i] - BOX_H / 2), (x, ys[i + 1] + BOX_H / 2))
    far_left = min(lefts) - 0.35
    for k, (start, end) in enumerate(residuals):
        xl = far_left - 0.15 * k
        y0 = ys[start] + BOX_H / 2 + 0.2
        y1 = ys[end]
        ax.plot([x, xl, xl], [y0, y0, y1], color="#5577aa", linewidth=1.0)
        arrow(ax, (xl, y1), (lefts[end], y1), color="#5577aa")
    if title:
        ax.text(x, ys[0] + 0.75, title, ha="center", va="bottom", fontsize=10, weight="bold")


def figure(name: str, panels: list[dict[str, object]], caption: str, width: float = 6.4) -> Path:
    """Save one figure of side-by-side columns to docs/img/<name>.png."""
    heights = [len(p["rows"]) for p in panels]  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(width * len(panels), 0.55 * max(heights) + 0.6))
    for i, panel in enumerate(panels):
        column(ax, x=i * 6.4, **panel)  # type: ignore[arg-type]
    ax.set_xlim(-3.4, 6.4 * (len(panels) - 1) + 3.4)
    ax.set_ylim(-0.9, (max(heights) - 1) * ROW + 1.3)
    ax.axis("off")
    ax.legend(
        handles=[
            Patch(facecolor=COLOURS["frozen"], edgecolor="#333333", label="frozen"),
            Patch(facecolor=COLOURS["trained"], edgecolor="#333333", label="trained"),
        ],
        loc="upper right",
        fontsize=8,
        frameon=False,
    )
    ax.set_title(caption, fontsize=8, y=-0.04, wrap=True)
    IMG.mkdir(parents=True, exist_ok=True)
    out = IMG / f"{name}.png"
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


def op(label: str, width: float = 1.5) -> Box:
    return Box(label, "op", width=width)


def decoder(
    proj: dict[str, Box], embed: list[Box] | None = None, attn: Box | None = None
) -> dict[str, object]:
    """A Llama decoder block with the given boxes for its seven projections."""
    p = proj
    rows = [
        embed or [Box("token embeddings", "io", width=2.4)],
        [op("RMSNorm")],
        [p["q"], p["k"], p["v"]],
        [attn or op("attention  softmax(QKᵀ/√d) V", width=3.0)],
        [p["o"]],
        [op("+", width=0.5)],
        [op("RMSNorm")],
        [p["gate"], p["up"]],
        [op("SiLU(gate) ⊙ up", width=2.0)],
        [p["down"]],
        [op("+", width=0.5)],
    ]
    return {"rows": rows, "residuals": ((1, 5), (6, 10))}


def projections(
    kind: str = "frozen", extra: str = "", hatch: str = "", only: tuple[str, ...] = ()
) -> dict[str, Box]:
    names = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "o_proj",
        "gate": "gate_proj",
        "up": "up_proj",
        "down": "down_proj",
    }
    return {
        key: Box(f"{name}  W", kind, extra if (not only or key in only) else "", width=1.25, hatch=hatch)
        for key, name in names.items()
    }


def lora() -> Path:
    return figure(
        "diagram-lora",
        [{**decoder(projections(extra="s·BA")), "title": "LoRA (r=16 on all seven projections)"}],
        "Each projection: y = W x + s·B A x. W frozen; A (r×in) and B (out×r) trained. merge_adapter() folds s·BA into W.",
    )


def dora() -> Path:
    return figure(
        "diagram-dora",
        [{**decoder(projections(extra="m, s·BA")), "title": "DoRA"}],
        "Each projection: W' = m · (W + s·BA) / ‖W + s·BA‖ per output row; m (one per row), A and B trained.",
    )


def qlora() -> Path:
    return figure(
        "diagram-qlora",
        [{**decoder(projections(kind="nf4", extra="s·BA", hatch="///")), "title": "QLoRA / LoftQ"}],
        "Each projection's W stored in 4-bit NF4 (hatched), dequantised per layer; LoRA's A, B trained in full precision.",
    )


def ia3() -> Path:
    proj = projections()
    proj["k"] = Box("k_proj  W", "frozen", "⊙ l_k", width=1.25)
    proj["v"] = Box("v_proj  W", "frozen", "⊙ l_v", width=1.25)
    proj["down"] = Box("l_ff ⊙ → down_proj W", "frozen", width=2.2)
    panel = decoder(proj)
    rows = panel["rows"]
    assert isinstance(rows, list)
    rows[9] = [Box("l_ff", "trained", width=0.6), Box("down_proj  W", "frozen", width=1.25)]
    return figure(
        "diagram-ia3",
        [{**panel, "title": "(IA)³ (Llama defaults: k, v, down)"}],
        "Keys and values are rescaled per channel (y = l ⊙ W x); the FFN's inner activation is rescaled before down_proj.",
    )


def full() -> Path:
    proj = projections(kind="trained")
    return figure(
        "diagram-full",
        [
            {
                **decoder(proj, embed=[Box("token embeddings", "trained", width=2.4)]),
                "title": "Full fine-tuning",
            }
        ],
        "Every weight trains (norms too); the optimizer keeps two states per parameter.",
    )


def prompt() -> Path:
    rows = [
        [
            Box("soft prompt P (n×d)", "trained", width=2.0),
            Box("token embeddings (L×d)", "frozen", width=2.5),
        ],
        [op("concatenate: n + L positions", width=2.6)],
        [Box("decoder block 1 (frozen)", width=2.6)],
        [Box("…", width=2.6)],
        [Box("decoder block N (frozen)", width=2.6)],
        [Box("LM head", width=2.0)],
    ]
    return figure(
        "diagram-prompt-tuning",
        [{"rows": rows, "title": "Prompt tuning"}],
        "Only the n virtual token vectors train; they act on every layer through attention alone.",
        width=6.0,
    )


def prefix() -> Path:
    proj = projections()
    panel = decoder(proj, attn=op("attention over [P_K ; K], [P_V ; V]", width=3.2))
    rows = panel["rows"]
    assert isinstance(rows, list)
    rows.insert(
        3,
        [
            Box("prefix keys P_K (n)", "trained", width=1.7),
            Box("prefix values P_V (n)", "trained", width=1.7),
        ],
    )
    panel["residuals"] = ((1, 6), (7, 11))
    return figure(
        "diagram-prefix-tuning",
        [{**panel, "title": "Prefix tuning (every layer)"}],
        "Each layer's attention reads n trained key and value vectors before the real ones; the projections stay frozen.",
    )


def bottleneck() -> Path:
    houlsby = [
        [Box("input (from previous block)", "io", width=2.6)],
        [Box("self-attention + output dense", width=2.6)],
        [Box("adapter", "trained", width=1.6)],
        [op("Add & LayerNorm", width=2.0)],
        [Box("FFN (intermediate, output dense)", width=2.8)],
        [Box("adapter", "trained", width=1.6)],
        [op("Add & LayerNorm", width=2.0)],
    ]
    mission = [
        [Box("input (from previous block)", "io", width=2.6)],
        [Box("multi-head attention", width=2.6)],
        [op("Add & Norm", width=2.0)],
        [Box("adapter", "trained", width=1.6)],
        [Box("FFN", width=2.8)],
        [op("Add & Norm", width=2.0)],
        [Box("adapter", "trained", width=1.6)],
    ]
    return figure(
        "diagram-bottleneck",
        [
            {
                "rows": houlsby,
                "residuals": ((1, 3), (4, 6)),
                "title": "Houlsby (deltatune, Houlsby et al. 2019)",
            },
            {"rows": mission, "residuals": ((1, 2), (4, 5)), "title": "as often drawn: after Add & Norm"},
        ],
        "Left: the adapter acts on the sub-layer's output before the residual add and LayerNorm (what deltatune and "
        "AdapterHub compute). Right: the order often drawn in tutorials, which is not Houlsby's.",
    )


def adapter_module() -> Path:
    rows = [
        [Box("h (d)", "io", width=1.2)],
        [Box("down-project  W_down (d→m)", "trained", width=3.2)],
        [op("ReLU", width=1.2)],
        [Box("up-project  W_up (m→d)", "trained", width=3.2)],
        [op("+", width=0.5)],
        [Box("h + f(h)", "io", width=1.2)],
    ]
    return figure(
        "diagram-adapter-module",
        [{"rows": rows, "residuals": ((1, 4),), "title": "The adapter module f"}],
        "2·d·m + m + d parameters. With the skip, W_up at zero (the default init) makes the block the identity, so training starts from "
        "the pretrained model.",
        width=7.0,
    )


ALL = (lora, dora, qlora, ia3, full, prompt, prefix, bottleneck, adapter_module)


def main() -> None:
    for draw in ALL:
        print(draw())


if __name__ == "__main__":
    sys.exit(main())
