"""Language geometry from pruning importance: keep-masks -> Hamming distances -> classical MDS and clustering.

After Shamrai & Hamolia 2025 ("Deep Language Geometry"): each language gets the binary keep-mask
that Wanda would prune with at a given sparsity when calibrated on that language alone; two languages are as far
apart as the share of weights on whose fate their masks disagree (normalized Hamming distance); classical
(Torgerson) MDS embeds the distance matrix in the plane and average-linkage clustering gives the tree. The math
here is pure numpy on packed bits; the masks come from tasks.py.

Families: the Glottolog classification as packaged in URIEL (``lang2vec``'s ``family_features.npz``, Littell et
al. 2017), looked up by ISO 639-3 code.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from pathlib import Path

import numpy as np

from converter.analyze import RunOptions
from converter.errors import DataError

log = logging.getLogger(__name__)


def hamming_matrix(masks: list[np.ndarray], total_bits: int) -> np.ndarray:
    """Pairwise normalized Hamming distances between packed bit masks (np.packbits output, equal lengths).

    Returns an (n, n) float64 symmetric matrix with zeros on the diagonal; entry (a, b) is the share of the
    ``total_bits`` mask bits on which a and b differ (padding bits of the packing are equal, so they never count).
    """
    n = len(masks)
    if n and any(m.shape != masks[0].shape for m in masks):
        raise ValueError("masks must all have the same packed length")
    out = np.zeros((n, n), dtype=np.float64)
    for a in range(n):
        for b in range(a + 1, n):
            diff = int(np.bitwise_count(np.bitwise_xor(masks[a], masks[b])).sum(dtype=np.int64))
            out[a, b] = out[b, a] = diff / max(total_bits, 1)
    return out


def classical_mds(dist: np.ndarray, dims: int = 2) -> np.ndarray:
    """Torgerson's classical MDS: B = -½ J D⁽²⁾ J with J = I - 11ᵀ/n; coordinates are the top ``dims``
    eigenvectors of B scaled by the square roots of their (clamped non-negative) eigenvalues.

    dist: (n, n) symmetric distances; returns (n, dims). Signs are fixed so each axis's largest-magnitude
    coordinate is positive (eigenvectors are defined up to sign; this makes the plot reproducible).
    """
    d = np.asarray(dist, dtype=np.float64)
    n = d.shape[0]
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ (d**2) @ j
    vals, vecs = np.linalg.eigh((b + b.T) / 2)  # ascending
    order = np.argsort(vals)[::-1][:dims]
    coords = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    if coords.shape[1] < dims:  # fewer points than dimensions
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    for k in range(dims):
        col = coords[:, k]
        if col.size and col[np.argmax(np.abs(col))] < 0:
            coords[:, k] = -col
    return coords


def group_means(dist: np.ndarray, codes: list[str], groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Mean distance within each group (over its distinct pairs) and between every two groups (over all pairs).

    Returns {group: {group: mean}}; codes of a group missing from ``codes`` are ignored; a group with fewer than
    two present members has no within-group mean (None).
    """
    idx = {c: i for i, c in enumerate(codes)}
    members = {g: [idx[c] for c in cs if c in idx] for g, cs in groups.items()}
    out: dict[str, dict[str, float]] = {}
    for g, a in members.items():
        out[g] = {}
        for h, b in members.items():
            if g == h:
                pairs = [(i, j) for k, i in enumerate(a) for j in a[k + 1 :]]
            else:
                pairs = [(i, j) for i in a for j in b]
            out[g][h] = float(np.mean([dist[i, j] for i, j in pairs])) if pairs else None
    return out


@functools.lru_cache(maxsize=1)
def _uriel_families() -> tuple[list[str], dict[str, int], np.ndarray]:
    # located through the distribution, not imported: lang2vec also installs a bin/lang2vec.py script that
    # shadows the package when a console script (langconvert) runs from that bin directory
    path = Path(str(metadata.distribution("lang2vec").locate_file("lang2vec/data/family_features.npz")))
    with np.load(path, allow_pickle=True) as z:
        feats = [str(f).removeprefix("F_") for f in z["feats"]]
        langs = {str(c): i for i, c in enumerate(z["langs"])}
        data = np.asarray(z["data"][..., 0] > 0)
    return feats, langs, data


def lineage(code: str) -> list[str]:
    """Glottolog lineage of a language tag, top family first (e.g. 'uk' -> Indo-European, Balto-Slavic, Slavic,
    East Slavic, ...); [] when URIEL does not list it."""
    import langcodes

    try:
        iso3 = langcodes.Language.get(code).to_alpha3()
    except (LookupError, ValueError):
        return []
    feats, langs, data = _uriel_families()
    row = langs.get(iso3)
    if row is None:
        return []
    return [feats[j] for j in np.flatnonzero(data[row])]


def family_label(code: str) -> str:
    """The colour group of a language in the plots: family and first branch ('Indo-European › Balto-Slavic'),
    the family alone when it has no branch listed, or 'unclassified'."""
    path = lineage(code)
    if not path:
        return "unclassified"
    return " › ".join(path[:2])


def analyze_geometry(
    source,
    corpora: dict[str, Path],
    out: Path,
    sparsity: float = 0.5,
    opts: RunOptions | None = None,
) -> dict:
    """Per-language Wanda keep-masks at ``sparsity`` -> ``out``/distances.json, geometry.png, dendrogram.png,
    hamming.png. ``source`` is a prepared :class:`converter.analyze.ModelSource`."""
    import time

    from converter.analyze import language_tasks, output_dir, plots, write_json
    from converter.analyze.tasks import run_tasks

    t0 = time.perf_counter()
    codes = list(corpora)
    if len(codes) < 3:
        raise DataError(f"analyze geometry needs at least 3 languages (--corpus CODE=FILE), got {len(codes)}.")
    opts = opts or RunOptions()
    with output_dir(out, opts.overwrite) as tmp:
        tasks = language_tasks(source, corpora, opts, ("masks",), sparsity=sparsity)
        results = run_tasks(tasks, opts.ray_address, opts.workers)
        masks = [r["masks"] for r in results]
        bits = results[0]["mask_bits"]
        dist = hamming_matrix(masks, sum(bits))
        offsets = results[0]["mask_offsets"] + [masks[0].size]
        per_layer = [
            hamming_matrix([m[offsets[k] : offsets[k + 1]] for m in masks], bits[k]).round(6).tolist()
            for k in range(len(bits))
        ]
        coords = classical_mds(dist)
        families = [family_label(c) for c in codes]
        data = {
            "languages": codes,
            "hamming": dist.round(6).tolist(),
            "mds": coords.round(6).tolist(),
            "families": families,
            "family_source": "Glottolog classification as packaged in URIEL (lang2vec 1.1.2 family_features)",
            "per_layer_hamming": per_layer,
            "settings": {
                "criterion": "wanda",
                "sparsity": sparsity,
                "samples": opts.samples,
                "seq_len": opts.seq_len,
                "seed": opts.seed,
                "mask_bits": int(sum(bits)),
                "model_type": source.model_type,
                "tokens_per_language": {r["name"]: r["tokens"] for r in results},
            },
        }
        title = f"{source.model_type}: Wanda keep-masks at {sparsity:.0%}, {opts.samples}x{opts.seq_len} tokens per language"
        plots.geometry_scatter(coords, codes, families, tmp / "geometry.png", title)
        plots.dendrogram(dist, codes, families, tmp / "dendrogram.png", title)
        plots.distance_heatmap(dist, codes, tmp / "hamming.png", "normalized Hamming distance of keep-masks")
        data["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "distances.json", data)
    log.info("analyze geometry: %d languages in %.1fs -> %s", len(codes), data["seconds"], out)
    return data
