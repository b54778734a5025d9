"""Aggregates and paper-style plots of sampling-sweep generations (Roy 2023, section 4 figures).

Input: a frame with one row per generation (``<name>_generations.jsonl``) or per grid cell
(``<name>_cells``, which carries ``n`` and per-cell means), plus a ``method`` column when several
methods are compared. Plots show the mean duplicate content words per generation against
temperature, max returned tokens (max_new_tokens + prompt tokens, averaged over prompts, the paper's
x axis) and top_k, one line per method.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

#: x axes of the paper's three figures (max_new_tokens is drawn at its mean max returned tokens)
PLOTS = ("temperature", "max_new_tokens", "top_k")
_AXIS = {"max_new_tokens": "max returned tokens"}
_XLABEL = {
    "temperature": "temperature",
    "max_new_tokens": "max returned tokens (max_new_tokens + prompt tokens, mean over prompts)",
    "top_k": "top_k",
}


def aggregate(df: pd.DataFrame, by: list[str]) -> list[dict[str, Any]]:
    """Per-generation rows -> one row per ``by`` group: generation count and means (std of the
    duplicates) of the counts; rows sorted by ``by``."""
    g = df.groupby(by, sort=True)
    out = pd.DataFrame({
        "n": g.size(),
        "dup_words_mean": g["duplicates"].mean(),
        "dup_words_std": g["duplicates"].std(ddof=0),
        "content_words_mean": g["n_content"].mean(),
        "dup_ratio_mean": g["duplicate_ratio"].mean(),
        "new_tokens_mean": g["n_new_tokens"].mean(),
        "max_returned_tokens_mean": g["max_returned_tokens"].mean(),
    }).reset_index()
    return out.to_dict(orient="records")


def combine_cells(frames: dict[str, pd.DataFrame], by: str) -> pd.DataFrame:
    """Cell tables of several methods (``method -> <name>_cells`` frame) -> method x ``by`` means,
    weighting every cell by its generation count (so every generation counts once)."""
    parts = []
    for method, cells in frames.items():
        w = cells["n"]
        grouped = cells.assign(_d=cells["dup_words_mean"] * w, _c=cells["content_words_mean"] * w,
                               _r=cells["max_returned_tokens_mean"] * w).groupby(by)
        part = pd.DataFrame({
            "dup_words_mean": grouped["_d"].sum() / grouped["n"].sum(),
            "content_words_mean": grouped["_c"].sum() / grouped["n"].sum(),
            "max_returned_tokens_mean": grouped["_r"].sum() / grouped["n"].sum(),
            "n": grouped["n"].sum(),
        }).reset_index()
        parts.append(part.assign(method=method))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_duplicates(df: pd.DataFrame, by: str, path: Path, title: str | None = None) -> Path:
    """Line plot of mean duplicate content words vs ``by``, one line per ``method``.

    ``df`` holds per-generation rows (``duplicates`` column) or method x ``by`` means
    (``dup_words_mean``, as from :func:`combine_cells`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "dup_words_mean" not in df:
        df = df.groupby(["method", by], sort=True).agg(
            dup_words_mean=("duplicates", "mean"), max_returned_tokens_mean=("max_returned_tokens", "mean"),
        ).reset_index()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (method, part) in enumerate(df.groupby("method", sort=True)):
        part = part.sort_values(by)
        x = part["max_returned_tokens_mean"] if by == "max_new_tokens" else part[by]
        # marker and dash vary too, so identical curves (e.g. bnb.nf4 and its reference) stay visible
        ax.plot(x, part["dup_words_mean"], marker="osD^v<>ph*"[i % 10], linestyle=("-", "--", ":", "-.")[i % 4],
                markersize=7 - (i % 4), label=str(method))
    if by == "top_k":
        ax.set_xscale("log")
    ax.set_xlabel(_XLABEL.get(by, by))
    ax.set_ylabel("duplicate content words per generation (mean)")
    ax.set_title(title or f"duplicate content words vs {_AXIS.get(by, by)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
