"""PNG plots beside report.md, drawn from the machine-readable report (``report.build_report``).

Each plot is optional: one whose numbers the run did not produce (a failed stage, prune.method none) is not
written, with one debug line. Figures are drawn on ``matplotlib.figure.Figure`` directly (the Agg canvas, no
pyplot and so no global figure state or display), and saved without the "Software" text chunk, so the same
numbers give the same bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOT_DIR = "plots"
BEFORE, AFTER = "#8c8c8c", "#1f77b4"


def _finite(x: Any) -> float | None:
    """A plottable number, or None for a missing, non-numeric (the manifest writes NaN as "nan") or NaN value."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _figure(width: float = 7.0, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def _lang_labels(codes: list[str], rep: dict[str, Any]) -> list[str]:
    tok = rep.get("tokenizer") or {}
    return [f"{c}\n(control)" if tok.get(c, {}).get("target") is False else c for c in codes]


def _grouped_bars(
    path: Path,
    title: str,
    ylabel: str,
    labels: list[str],
    before: list[float],
    after: list[float],
    names: tuple[str, str],
) -> None:
    fig = _figure(max(4.0, 1.2 * len(labels) + 2.5))
    ax = fig.add_subplot()
    x = range(len(labels))
    w = 0.38
    bars_b = ax.bar([i - w / 2 for i in x], before, w, label=names[0], color=BEFORE)
    bars_a = ax.bar([i + w / 2 for i in x], after, w, label=names[1], color=AFTER)
    for bars in (bars_b, bars_a):
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.15)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)  # below the axes: never over a bar
    _save(fig, path)


def plot_quality(rep: dict[str, Any], path: Path) -> bool:
    """Bits per byte on held-out text per language: the original model against the shipped model (the ONNX
    artifact when validated, else the converted PyTorch model), the pair ``bpb_increase`` compares."""
    rows = []
    for code, q in (rep.get("quality") or {}).items():
        after = q.get("artifact") or q.get("converted") or {}
        b, a = _finite((q.get("original") or {}).get("bpb")), _finite(after.get("bpb"))
        if b is not None and a is not None:
            rows.append((code, b, a))
    if not rows:
        return False
    shipped = (
        "artifact (ONNX)" if any("artifact" in q for q in rep["quality"].values()) else "converted (PyTorch)"
    )
    codes = [r[0] for r in rows]
    _grouped_bars(
        path,
        "Bits per UTF-8 byte on held-out text (lower is better)",
        "bits per byte",
        _lang_labels(codes, rep),
        [r[1] for r in rows],
        [r[2] for r in rows],
        ("original", shipped),
    )
    return True


def plot_tokens_per_char(rep: dict[str, Any], path: Path) -> bool:
    """Tokens per character of held-out text per language with the original and the trimmed tokenizer."""
    rows = []
    for code, t in (rep.get("tokenizer") or {}).items():
        b = _finite((t.get("before") or {}).get("tokens_per_char"))
        a = _finite((t.get("after") or {}).get("tokens_per_char"))
        if b is not None and a is not None:
            rows.append((code, b, a))
    if not rows:
        return False
    codes = [r[0] for r in rows]
    _grouped_bars(
        path,
        "Tokens per character of held-out text (lower is better)",
        "tokens per character",
        _lang_labels(codes, rep),
        [r[1] for r in rows],
        [r[2] for r in rows],
        ("original tokenizer", "trimmed tokenizer"),
    )
    return True


def _layer_bars(
    path: Path,
    title: str,
    ylabel: str,
    layers: list[int],
    values: list[float],
    ref: float | None,
    ref_label: str,
    skipped: list[int],
) -> None:
    fig = _figure(max(5.0, 0.28 * len(layers) + 2.5))
    ax = fig.add_subplot()
    ax.bar(layers, values, 0.8, color=AFTER)
    if ref is not None:
        ax.axhline(ref, color="#d62728", linestyle="--", linewidth=1, label=ref_label)
        fig.legend(loc="outside lower center", fontsize=8)
    ax.set_xlabel("decoder layer" + (f" (left dense: {', '.join(map(str, skipped))})" if skipped else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # integer ticks only; every layer when they fit
    ax.set_xticks(layers if len(layers) <= 32 else layers[:: math.ceil(len(layers) / 32)])
    ax.margins(y=0.1)
    _save(fig, path)


def plot_sparsity(rep: dict[str, Any], path: Path) -> bool:
    """Unstructured / N:M pruning: measured sparsity per decoder layer (mean over its pruned linears, as in the
    report's table); layers left dense on purpose (``skipped_layers``) show as 0%."""
    prune = rep.get("prune") or {}
    if prune.get("method") in (None, "none", "experts") or not prune.get("per_layer"):
        return False
    per: dict[int, float] = {int(i): 0.0 for i in prune.get("skipped_layers") or []}
    for layer, linears in prune["per_layer"].items():
        vals = [
            v
            for v in map(_finite, linears.values() if isinstance(linears, dict) else [linears])
            if v is not None
        ]
        if vals:
            per[int(layer)] = sum(vals) / len(vals)
    if not per:
        return False
    layers = sorted(per)
    target = _finite(prune.get("target_sparsity"))
    _layer_bars(
        path,
        f"Measured sparsity per layer ({prune['method']}, {prune.get('pattern', '')})",
        "zeros in pruned linears (%)",
        layers,
        [100 * per[i] for i in layers],
        100 * target if target is not None else None,
        "target",
        sorted(int(i) for i in prune.get("skipped_layers") or []),
    )
    return True


def plot_ffn_width(rep: dict[str, Any], path: Path) -> bool:
    """Structured 'experts' pruning: FFN neurons kept per decoder layer against the original width."""
    ffn = (rep.get("prune") or {}).get("ffn") or {}
    before = _finite(ffn.get("width_before"))
    per = {int(i): before for i in (rep.get("prune") or {}).get("skipped_layers") or [] if before is not None}
    for layer, st in (ffn.get("layers") or {}).items():
        kept = _finite((st or {}).get("kept"))
        if kept is not None:
            per[int(layer)] = kept
    if not per:
        return False
    layers = sorted(per)
    _layer_bars(
        path,
        f"FFN width kept per layer (experts, {ffn.get('selection', '')})",
        "FFN neurons kept",
        layers,
        [per[i] for i in layers],
        before,
        "original width",
        sorted(int(i) for i in (rep.get("prune") or {}).get("skipped_layers") or []),
    )
    return True


PLOTS: dict[str, Callable[[dict[str, Any], Path], bool]] = {
    "quality": plot_quality,
    "tokens_per_char": plot_tokens_per_char,
    "sparsity": plot_sparsity,
    "ffn_width": plot_ffn_width,
}


def write_plots(rep: dict[str, Any], root: Path) -> dict[str, str]:
    """Draw every plot the report has numbers for under ``root/plots``; returns name -> path relative to root.

    A plot that fails to draw is logged and left out: the plots illustrate the report, they must never cost
    the run its report.md and report.json."""
    written: dict[str, str] = {}
    for name, draw in PLOTS.items():
        rel = f"{PLOT_DIR}/{name}.png"
        try:
            drawn = draw(rep, root / rel)
        except Exception:
            log.warning("report plot %s could not be drawn", name, exc_info=True)
            (root / rel).unlink(missing_ok=True)
            continue
        if drawn:
            written[name] = rel
        else:
            log.debug("report plot %s: no numbers for it in this run, not written", name)
    return written
