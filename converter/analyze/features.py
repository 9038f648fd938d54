"""Large-magnitude hidden dimensions of translation prompts against monolingual text.

After Kim et al. 2024 ("Pruning Multilingual Large Language Models for Multilingual Inference", Findings of
EMNLP 2024): a few hidden dimensions carry activations far larger than the rest, and the ones translation
prompts light up are not all the ones plain text does; calibrating pruning on translation demonstrations keeps
them (``calibration.translation`` in a recipe). Here, per layer, each dimension's RMS over the tokens of the
layer's output (every window's first position excluded: it is an attention sink with its own outliers) is
computed for k-shot translation prompts of each direction and for monolingual text of its two languages; the
overlap of the top-k dimensions of the two says how much of translation's large-magnitude features plain-text
calibration would see.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from converter.analyze import RunOptions
from converter.errors import DataError

log = logging.getLogger(__name__)


def rms(hidden_sq: np.ndarray, tokens: int) -> np.ndarray:
    """(layers, hidden) Σh² -> per-dimension RMS."""
    return np.sqrt(hidden_sq / max(tokens, 1))


def top_dims(values: np.ndarray, k: int) -> list[list[int]]:
    """(layers, hidden) -> per layer the k largest dimensions, largest first (ties: lower index)."""
    order = np.argsort(-values, axis=1, kind="stable")
    return [order[i, :k].tolist() for i in range(values.shape[0])]


def overlap(a: list[list[int]], b: list[list[int]]) -> list[float]:
    """Per layer |a ∩ b| / |a| of two top-k lists."""
    return [len(set(x) & set(y)) / max(len(x), 1) for x, y in zip(a, b)]


def analyze_features(
    source,
    parallel: dict[str, Path],
    directions: list[str],
    out: Path,
    shots: int = 3,
    top: int = 16,
    opts: RunOptions | None = None,
) -> dict:
    """-> ``out``/features.json and features.png; see the module doc."""
    import torch
    from pydantic import ValidationError

    from converter.analyze import language_tasks, output_dir, plots, write_json
    from converter.analyze.tasks import Task, run_tasks
    from converter.calibrate import read_parallel, translation_windows
    from converter.recipe import TranslationConfig

    t0 = time.perf_counter()
    opts = opts or RunOptions()
    try:
        cfg = TranslationConfig(files={c: str(p) for c, p in parallel.items()}, directions=directions, shots=shots)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise DataError(f"--direction/--parallel: {msg}.") from None
    text = read_parallel(cfg, 0.1, lambda patterns, _what: [Path(p) for p in patterns])
    langs = sorted({c for pair in cfg.pairs for c in pair}, key=list(parallel).index)
    with output_dir(out, opts.overwrite) as tmp:
        tasks = language_tasks(source, {c: parallel[c] for c in langs}, opts, ("hidden",))
        for t in tasks:
            t.name = f"text:{t.name}"
        for src, tgt in cfg.pairs:
            one = cfg.model_copy(update={"directions": [f"{src}-{tgt}"]})
            wins, _ = translation_windows(
                source.tokenizer, text, one, opts.samples, opts.seq_len, torch.Generator().manual_seed(opts.seed)
            )
            tasks.append(
                Task(
                    name=f"translation:{src}-{tgt}",
                    model=source.model,
                    windows=torch.stack(wins).numpy(),
                    want=("hidden",),
                    batch_size=opts.batch_size,
                    meta=tasks[0].meta,
                )
            )
        results = {r["name"]: r for r in run_tasks(tasks, opts.ray_address, opts.workers)}
        norms = {name: rms(r["hidden_sq"], r["hidden_tokens"]) for name, r in results.items()}
        tops = {name: top_dims(v, top) for name, v in norms.items()}
        series: dict[str, list[float]] = {}
        for src, tgt in cfg.pairs:
            mono = (norms[f"text:{src}"] + norms[f"text:{tgt}"]) / 2
            series[f"{src}-{tgt}"] = overlap(tops[f"translation:{src}-{tgt}"], top_dims(mono, top))
        data = {
            "directions": [f"{s}-{t}" for s, t in cfg.pairs],
            "languages": langs,
            "layers": int(next(iter(norms.values())).shape[0]),
            "top": top,
            "overlap": {k: [round(v, 4) for v in s] for k, s in series.items()},
            "top_dims": tops,
            "max_rms": {name: v.max(axis=1).round(3).tolist() for name, v in norms.items()},
            "settings": {
                "shots": shots,
                "samples": opts.samples,
                "seq_len": opts.seq_len,
                "seed": opts.seed,
                "model_type": source.model_type,
            },
        }
        plots.feature_overlap(series, top, tmp / "features.png")
        data["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "features.json", data)
    log.info("analyze features: %d directions in %.1fs -> %s", len(cfg.pairs), data["seconds"], out)
    return data
