"""The report's PNG figures (matplotlib, Agg), drawn from the report's numbers alone.

| file | paper | what |
|---|---|---|
| resource_usage.png | Fig. 5 | dymu's FLOPs / the anchor's over the simplex, c = 0, 0.5, 1 |
| marginal.png | Fig. 7 | loss of task i against r_i (others equal), dymu ± adaptation, c = 0, 1 |
| tradeoff.png | Figs. 13–14 | loss of task i against task j, r on the edge between them |
| hv_vs_time.png | Fig. 6 | HV against training time: static subsets, and each dynamic method |
| trees.png | Figs. 16–17 | dymu's predicted trees for uniform and one-hot preferences |
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection

RESOURCE_CMAP = "viridis"
_ROW_STYLE = {
    "dymu-c0": ("tab:blue", "-", "dymu c=0"),
    "dymu-c1": ("tab:orange", "-", "dymu c=1"),
    "dymu-noadapt-c0": ("tab:blue", "--", "dymu c=0 w/o adaptation"),
    "dymu-noadapt-c1": ("tab:orange", "--", "dymu c=1 w/o adaptation"),
    "phn": ("tab:red", ":", "PHN"),
    "phn-bn": ("tab:green", ":", "PHN-BN"),
    "cpmtl": ("tab:purple", ":", "Controllable Pareto MTL"),
}


def _names(report: dict[str, Any]) -> list[str]:
    return [t["name"] for t in report["tasks"]]


def _ternary_xy(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric (r_1, r_2, r_3) -> 2-D: vertex i of an equilateral triangle is task i."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    xy = r @ corners
    return xy[:, 0], xy[:, 1]


def resource_usage(report: dict[str, Any], path: Path) -> None:
    names = _names(report)
    usage = list(report["resource_usage"].values())
    n = len(names)
    fig, axes = plt.subplots(1, len(usage), figsize=(4.2 * len(usage), 3.8), squeeze=False)
    for ax, u in zip(axes[0], usage, strict=True):
        r = np.array([g["r"] for g in u["grid"]])
        frac = np.array([g["fraction_flops"] for g in u["grid"]])
        title = f"c = {u['c']:.1f} (mean {u['mean_fraction_flops']:.3f})"
        if n == 3:
            x, y = _ternary_xy(r)
            tpc = ax.tripcolor(x, y, frac, shading="gouraud", cmap=RESOURCE_CMAP, vmin=0, vmax=1)
            for (vx, vy), name in zip(
                [(0, 0), (1, 0), (0.5, math.sqrt(3) / 2)], names, strict=True
            ):
                ax.annotate(
                    name, (vx, vy), ha="center", va="top" if vy == 0 else "bottom", fontsize=8
                )
            ax.set_aspect("equal")
            ax.axis("off")
            fig.colorbar(tpc, ax=ax, shrink=0.7, label="FLOPs / anchor")
        elif n == 2:
            ax.plot(r[:, 0], frac, marker="o", ms=3)
            ax.set_xlabel(f"r_{names[0]} (r_{names[1]} = 1 − r_{names[0]})")
            ax.set_ylabel("FLOPs / anchor")
            ax.set_ylim(0, 1.05)
        else:
            ax.scatter(r.max(1), frac, s=6)
            ax.set_xlabel("max_i r_i")
            ax.set_ylabel("FLOPs / anchor")
            ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    fig.suptitle("dymu: resource usage over task preferences (paper Fig. 5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def marginal(report: dict[str, Any], path: Path) -> None:
    names = _names(report)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        for key, pts in report["marginal"].items():
            color, style, label = _ROW_STYLE.get(key, ("k", "-", key))
            mine = [p for p in pts if p["task"] == name]
            ax.plot(
                [p["r_i"] for p in mine],
                [p["losses"][name] for p in mine],
                color=color,
                ls=style,
                marker="o",
                ms=3,
                label=label,
            )
        ax.set_xlabel(f"r_{name} (other tasks equal)")
        ax.set_ylabel(f"w·L {name}")
        ax.set_title(name, fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Marginal controllability (paper Fig. 7)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff(report: dict[str, Any], path: Path) -> None:
    pairs = []
    for pts in report["tradeoff_curves"].values():
        for p in pts:
            if p["pair"] not in pairs:
                pairs.append(p["pair"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs), 3.4), squeeze=False)
    for k, (ax, (a, b)) in enumerate(zip(axes[0], pairs, strict=True)):
        for key, pts in report["tradeoff_curves"].items():
            color, style, label = _ROW_STYLE.get(key, ("k", "-", key))
            mine = sorted((p for p in pts if p["pair"] == [a, b]), key=lambda p: p["t"])
            ax.plot(
                [p["losses"][a] for p in mine],
                [p["losses"][b] for p in mine],
                color=color,
                ls=style,
                marker="o",
                ms=3,
                label=label,
            )
        ax.set_xlabel(f"w·L {a}")
        ax.set_ylabel(f"w·L {b}")
        ax.set_title(f"{a} vs {b} (others r = 0)", fontsize=9)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Pairwise trade-off curves (paper Figs. 13–14)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hv_vs_time(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    static = report["methods"].get("static")
    if static and static.get("hv_vs_train_time"):
        curve = static["hv_vs_train_time"]
        t = np.array([p["train_seconds"] for p in curve]) / 60
        m = np.array([p["hv_mean"] for p in curve])
        s = np.array([p["hv_std"] for p in curve])
        ax.plot(t, m, "o-", color="tab:gray", label="static nets (subsets of k)")
        ax.fill_between(t, m - s, m + s, color="tab:gray", alpha=0.25)
    for key, entry in report["methods"].items():
        if entry.get("train_seconds") is None or key == "static" or "noadapt" in key:
            continue
        color, _, label = _ROW_STYLE.get(key, ("k", "-", entry["label"]))
        ax.scatter(
            [entry["train_seconds"] / 60],
            [entry["hypervolume"]],
            color=color,
            label=label,
            zorder=3,
        )
    ax.set_xlabel("training time (minutes, this machine)")
    ax.set_ylabel("hypervolume")
    ax.set_title("Hypervolume vs training time (paper Fig. 6)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trees(report: dict[str, Any], path: Path) -> None:
    names = _names(report)
    items = list(report["trees"].items())
    cols = 2
    rows = math.ceil(len(items) / cols)
    n = len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 0.9 * n * cols, 2.4 * rows), squeeze=False)
    for ax, (label, tree) in zip(axes.flat, items, strict=False):
        parents = tree["parents"]  # parents[b][j]: stream of layer b feeding node (b+1, j)
        layers = len(parents) + 1
        used = [set(range(n))]
        for b in reversed(range(layers - 1)):
            used.insert(0, {parents[b][j] for j in used[0]})
        nodes = [(j, layer, j in used[layer]) for layer in range(layers) for j in range(n)]
        ax.scatter(
            [x for x, _, _ in nodes],
            [y for _, y, _ in nodes],
            s=60,
            c=["tab:blue" if on else "0.85" for _, _, on in nodes],
            zorder=3,
        )
        # one collection per panel: a plot call per edge is slow for N = 20
        edges = [[(parents[y - 1][x], y - 1), (x, y)] for x, y, on in nodes if on and y > 0]
        ax.add_collection(LineCollection(edges, colors="tab:blue", linewidths=1.5, zorder=2))
        ax.set_ylim(-0.5, layers - 0.5)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xticks(range(n), names, rotation=30 if n > 2 else 0, fontsize=7, ha="right")
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer")
        ax.set_title(f"{label}: {tree['gflops']:.3f} GFLOPs", fontsize=8)
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.suptitle(
        "Predicted trees (paper Figs. 16–17): used nodes blue, heads above the top layer",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {
    "resource_usage.png": (resource_usage, "dymu's FLOPs over the simplex, c = 0, 0.5, 1 (Fig. 5)"),
    "marginal.png": (marginal, "loss of task i against r_i (Fig. 7)"),
    "tradeoff.png": (tradeoff, "pairwise trade-off curves (Figs. 13-14)"),
    "hv_vs_time.png": (hv_vs_time, "hypervolume against training time (Fig. 6)"),
    "trees.png": (trees, "predicted trees for a few preferences (Figs. 16-17)"),
}


def write_figures(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Draw every figure of :data:`FIGURES` into ``out``; returns {file name: description}."""
    written = {}
    for name, (draw, what) in FIGURES.items():
        draw(report, out / name)
        written[name] = what
    return written
