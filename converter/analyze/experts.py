"""Expert-activation maps per language (after Liu et al. 2024, "Unraveling Babel", arXiv:2402.16367).

Every FFN is MoE-fied exactly as structured pruning does it (prune/moe.py: balanced k-means over the
up-projection rows, seed = layer index), so an expert here is the expert ``prune.method: experts`` keeps or
removes. Per language and layer, an expert's activation frequency is the share of that language's tokens on which
it is among the token's top quarter of experts. A language's *top set* in a layer is its ``E/4`` most frequent
experts; the summary counts, per layer, the experts in every language's top set (shared) and those only one
language has in its top set (specific), and the Jaccard overlap of every two languages' top sets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from converter.analyze import RunOptions
from converter.errors import DataError

log = logging.getLogger(__name__)


def top_sets(freq: np.ndarray, n_top: int) -> list[set[int]]:
    """(layers, experts) frequencies -> per layer the ``n_top`` most frequent experts (ties: lower index)."""
    order = np.argsort(-freq, axis=1, kind="stable")
    return [set(order[k, :n_top].tolist()) for k in range(freq.shape[0])]


def sharing(freqs: dict[str, np.ndarray], n_top: int) -> dict:
    """Shared / specific top-set counts per layer and the mean pairwise Jaccard overlap (see module doc)."""
    codes = list(freqs)
    tops = {c: top_sets(f, n_top) for c, f in freqs.items()}
    n_layers = next(iter(freqs.values())).shape[0]
    shared = np.array([len(set.intersection(*(tops[c][k] for c in codes))) for k in range(n_layers)])
    specific = {
        c: np.array(
            [len(tops[c][k] - set().union(*(tops[o][k] for o in codes if o != c))) for k in range(n_layers)]
        )
        for c in codes
    }
    overlap = np.zeros((len(codes), len(codes)))
    for a, ca in enumerate(codes):
        for b, cb in enumerate(codes):
            overlap[a, b] = np.mean(
                [len(tops[ca][k] & tops[cb][k]) / len(tops[ca][k] | tops[cb][k]) for k in range(n_layers)]
            )
    return {"shared": shared, "specific": specific, "overlap": overlap}


def analyze_experts(
    source,
    corpora: dict[str, Path],
    out: Path,
    experts: int = 64,
    opts: RunOptions | None = None,
) -> dict:
    """-> ``out``/experts.json, experts_<code>.png per language, shared.png."""
    from converter.analyze import language_tasks, output_dir, plots, write_json
    from converter.analyze.tasks import run_tasks

    t0 = time.perf_counter()
    codes = list(corpora)
    if not codes:
        raise DataError("analyze experts needs at least one --corpus CODE=FILE.")
    opts = opts or RunOptions()
    with output_dir(out, opts.overwrite) as tmp:
        tasks = language_tasks(source, corpora, opts, ("experts",), experts=experts)
        results = run_tasks(tasks, opts.ray_address, opts.workers)
        freqs = {r["name"]: r["expert_frequency"] for r in results}
        n_top = max(1, experts // 4)
        s = sharing(freqs, n_top)
        data = {
            "languages": codes,
            "layers": int(next(iter(freqs.values())).shape[0]),
            "experts": experts,
            "top": n_top,
            "frequency": {c: f.round(5).tolist() for c, f in freqs.items()},
            "share": {r["name"]: r["expert_share"].round(6).tolist() for r in results},
            "shared_per_layer": s["shared"].tolist(),
            "specific_per_layer": {c: v.tolist() for c, v in s["specific"].items()},
            "top_overlap": s["overlap"].round(4).tolist(),
            "settings": {
                "samples": opts.samples,
                "seq_len": opts.seq_len,
                "seed": opts.seed,
                "model_type": source.model_type,
            },
        }
        for c, f in freqs.items():
            plots.expert_heatmap(f, c, tmp / f"experts_{c}.png")
        plots.shared_experts(s["shared"], s["specific"], s["overlap"], codes, n_top, tmp / "shared.png")
        data["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "experts.json", data)
    log.info("analyze experts: %d languages in %.1fs -> %s", len(codes), data["seconds"], out)
    return data
