"""Loss curve of a QAT run (PNG, Agg canvas, no pyplot state)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Distillation loss per step (and the learning rate on a second axis); returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], lw=1, label="loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("distillation loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in history], lw=1, color="tab:gray", ls="--", label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
