"""PNG figures of the analyses (matplotlib's object API on the Agg canvas: no pyplot state, no display needed).

Files are written with no software/date metadata, so the same numbers give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _colours(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {lab: cmap(k % 10) for k, lab in enumerate(dict.fromkeys(labels))}


def geometry_scatter(coords: np.ndarray, codes: list[str], families: list[str], path: Path, title: str) -> Path:
    """MDS coordinates, one labelled point per language, coloured by family."""
    fig = _figure(7.5, 6)
    ax = fig.add_subplot()
    colours = _colours(families)
    for fam, col in colours.items():
        idx = [k for k, f in enumerate(families) if f == fam]
        ax.scatter(coords[idx, 0], coords[idx, 1], s=60, color=col, label=fam)
    for k, code in enumerate(codes):
        ax.annotate(code, coords[k], textcoords="offset points", xytext=(5, 4), fontsize=10)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best", title="family (Glottolog via URIEL)", title_fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def dendrogram(dist: np.ndarray, codes: list[str], families: list[str], path: Path, title: str) -> Path:
    """Average-linkage (UPGMA) tree of the distance matrix; leaf labels coloured by family."""
    from scipy.cluster.hierarchy import dendrogram as draw
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    z = linkage(squareform(dist, checks=False), method="average")
    draw(z, labels=codes, ax=ax, color_threshold=0, above_threshold_color="0.3")
    colours = _colours(families)
    fam_of = dict(zip(codes, families))
    for lab in ax.get_xticklabels():
        lab.set_color(colours[fam_of[lab.get_text()]])
    ax.set_ylabel("normalized Hamming distance")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def distance_heatmap(dist: np.ndarray, codes: list[str], path: Path, title: str) -> Path:
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    im = ax.imshow(dist, cmap="viridis")
    ax.set_xticks(range(len(codes)), codes)
    ax.set_yticks(range(len(codes)), codes)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def expert_heatmap(freq: np.ndarray, code: str, path: Path) -> Path:
    """(layers, experts) activation frequency of one language."""
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    im = ax.imshow(freq, aspect="auto", cmap="magma", vmin=0, vmax=max(float(freq.max()), 1e-6), origin="lower")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{code}: share of tokens on which each expert is in the token's top quarter", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def _int_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def shared_experts(shared: np.ndarray, specific: dict[str, np.ndarray], overlap: np.ndarray, codes: list[str],
                   n_top: int, path: Path) -> Path:
    """Left: per layer, experts in every language's top set and the mean count only one language has. Right:
    mean over layers of the pairwise overlap (Jaccard) of the languages' top sets."""
    fig = _figure(12, 4.8)
    ax = fig.add_subplot(1, 2, 1)
    layers = np.arange(len(shared))
    ax.plot(layers, shared, marker="o", label="in every language's top set")
    ax.plot(layers, np.mean(np.stack(list(specific.values())), axis=0), marker="s",
            label="only in one language's top set (mean per language)")
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_xlabel("layer")
    ax.set_ylabel(f"experts (top set = {n_top} most frequent)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.imshow(overlap, cmap="viridis", vmin=0, vmax=1)
    ax2.set_xticks(range(len(codes)), codes)
    ax2.set_yticks(range(len(codes)), codes)
    ax2.set_title("top-set overlap (Jaccard), mean over layers", fontsize=10)
    fig.colorbar(im, ax=ax2, shrink=0.8)
    return _save(fig, path)


def feature_overlap(overlap: dict[str, list[float]], top: int, path: Path) -> Path:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for name, series in overlap.items():
        ax.plot(range(len(series)), series, marker="o", label=name)
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer (output of)")
    ax.set_ylabel(f"top-{top} dimensions in common (share)")
    ax.set_title("large-magnitude hidden dimensions: translation prompts vs monolingual text", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
