"""report.md (for people) and report.json (for CI) from the manifest of a run."""

from __future__ import annotations

import json
import math
from typing import Any

from converter.manifest import Manifest, _jsonable
from converter.report_plots import write_plots


def _num(x: Any, fmt: str = "{:,.3f}") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    try:
        return fmt.format(x)
    except (ValueError, TypeError):
        return str(x)


def _mb(n: Any) -> str:
    return "—" if not n else f"{n / 1e6:,.1f} MB"


def _mark(passed: bool | None) -> str:
    return {True: "✓", False: "✗", None: "·"}[passed]


def _image(rep: dict[str, Any], name: str, alt: str) -> str:
    """A relative markdown image link to a plot written beside report.md, or nothing when it was not drawn."""
    rel = (rep.get("plots") or {}).get(name)
    return f"\n![{alt}]({rel})\n" if rel else ""


def build_report(data: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable report: status, gates and the headline numbers of every stage."""
    stages = data.get("stages", {})
    val = stages.get("validate", {}).get("metrics", {})
    return {
        "name": data.get("name"),
        "status": data.get("status"),
        "error": data.get("error"),
        "recipe_sha256": data.get("recipe_sha256"),
        "stages": {
            k: {
                "status": v.get("status"),
                "seconds": v.get("seconds"),
                "peak_rss_mb": v.get("peak_rss_mb"),
                "peak_cuda_mb": v.get("peak_cuda_mb"),
                "headline": v.get("metrics", {}).get("headline"),
            }
            for k, v in stages.items()
        },
        "checks": val.get("checks", []),
        "failed_gates": [c["name"] for c in val.get("checks", []) if c.get("passed") is False],
        "size": val.get("size"),
        "quality": val.get("quality"),
        "tokenizer": val.get("tokenizer"),
        "onnx": val.get("onnx"),
        "speed": val.get("speed"),
        "lm_eval": val.get("lm_eval"),
        "prune": stages.get("prune", {}).get("metrics"),
        "vocab": {k: v for k, v in stages.get("trim_vocab", {}).get("metrics", {}).items() if k != "token_map"},
        "export": stages.get("export", {}).get("metrics"),
        "plots": {},  # name -> PNG path relative to the release directory, filled by write_report
    }


def _lm_eval_section(lm: dict[str, Any] | None) -> str:
    """validate.lm_eval: per task, the compared metric of the original and the converted PyTorch model."""
    if not lm or not lm.get("tasks"):
        return ""
    out = ["\n## Downstream tasks (lm-evaluation-harness, PyTorch)\n\n"]
    shots = lm.get("num_fewshot", 0)
    limit = lm.get("limit")
    scope = f"at most {limit} items per task" if limit else "every item of each task"
    out.append(f"{shots}-shot, {scope} (± is one standard error).\n\n")
    out.append("| task | metric | items | original | converted | change |\n|---|---|---:|---:|---:|---:|\n")

    def score(t: dict[str, Any], key: str, err: str) -> str:
        e = t.get(err)
        return _num(t.get(key)) + (f" ± {e:.3f}" if isinstance(e, float) and not math.isnan(e) else "")

    for name, t in lm["tasks"].items():
        delta = _num(100 * t["delta"], "{:+.1f} pts") if t.get("delta") is not None else "—"
        lang = f" ({t['language']}{', control' if t.get('control') else ''})" if t.get("language") else ""
        out.append(
            f"| {name}{lang} | {t.get('metric') or '—'} | {_num(t.get('items'))} | "
            f"{score(t, 'original', 'stderr_original')} | {score(t, 'converted', 'stderr_converted')} | {delta} |\n"
        )
    local = lm.get("local_tasks") or {}
    if local:
        out.append(
            "\nBuilt-in next-sentence tasks: a held-out sentence and 4 candidates for the sentence after it, the 3 "
            "wrong ones from other documents; only held-out lines are used ("
            + "; ".join(
                f"{v['language']}: {v['items']} items from {v['heldout_lines']} held-out lines of {v['documents']} "
                "documents"
                for v in local.values()
            )
            + "). Chance is 25%.\n"
        )
    return "".join(out)


def render_markdown(rep: dict[str, Any], data: dict[str, Any]) -> str:
    out: list[str] = []
    status = rep["status"]
    title = {"ok": "✓ release ready", "gate_failed": "✗ validation gates failed", "failed": "✗ run failed"}.get(
        status, status
    )
    recipe = data.get("recipe", {})
    langs = ", ".join(lang["code"] for lang in recipe.get("languages", []))
    out.append(f"# {rep['name']}: {title}\n")
    out.append(f"Model `{recipe.get('model', {}).get('source')}` → languages {langs}; started {data.get('started')}, ")
    out.append(f"{_num(data.get('seconds'), '{:.0f}')} s on {data.get('device')} ({data['host']['cpus']} CPUs).\n")
    if rep.get("error"):
        out.append(f"\n**Error:** {rep['error']}\n")

    out.append("\n## Stages\n\n| stage | status | seconds | peak RSS MB | result |\n|---|---|---:|---:|---|\n")
    for name, st in rep["stages"].items():
        rss = _num(st.get("peak_rss_mb"), "{:,.0f}")
        out.append(f"| {name} | {st['status']} | {_num(st['seconds'], '{:.1f}')} | {rss} | {st['headline'] or ''} |\n")

    if rep["checks"]:
        out.append("\n## Checks\n\n| | check | value | gate | detail |\n|---|---|---:|---|---|\n")
        for c in rep["checks"]:
            thr = f"{c['op']} {_num(c['threshold'], '{:g}')}" if c.get("op") else "report only"
            out.append(f"| {_mark(c['passed'])} | {c['name']} | {_num(c['value'], '{:.4g}')} | {thr} | {c['detail']} |\n")
        if rep["failed_gates"]:
            out.append(f"\n**Failed gates:** {', '.join(rep['failed_gates'])}.\n")

    size = rep.get("size")
    vocab = rep.get("vocab") or {}
    if size:
        b, a = size["before"], size["after"]
        out.append("\n## Size\n\n| | before | after |\n|---|---:|---:|\n")
        out.append(f"| vocabulary | {_num(b.get('vocab_size'))} | {_num(a.get('vocab_size'))} |\n")
        out.append(f"| parameters | {_num(b.get('parameters'))} | {_num(a.get('parameters'))} |\n")
        out.append(f"| non-zero parameters | {_num(b.get('nonzero_parameters'))} | {_num(a.get('nonzero_parameters'))} |\n")
        out.append(f"| safetensors on disk | {_mb(b.get('checkpoint_bytes'))} | {_mb(a.get('checkpoint_bytes'))} |\n")
        if a.get("onnx_bytes"):
            out.append(f"| ONNX on disk | — | {_mb(a.get('onnx_bytes'))} |\n")
    if vocab.get("policies"):
        only = vocab.get("only") or {}
        out.append("\n### Vocabulary selection\n\n| policy | tokens selected | selected by no other policy |\n")
        out.append("|---|---:|---:|\n")
        for k, v in vocab["policies"].items():
            out.append(f"| {k} | {_num(v)} | {_num(only.get(k))} |\n")
        out.append(f"| merge closure (pieces kept tokens are built from) | {_num(vocab.get('closure_added'))} | |\n")
        notes = []
        if vocab.get("cap_dropped"):
            notes.append(f"{_num(vocab['cap_dropped'])} candidates left out by max_size")
        if vocab.get("unreachable_skipped"):
            notes.append(f"{_num(vocab['unreachable_skipped'])} script tokens skipped as unreachable")
        if vocab.get("corpus_coverage") is not None:
            notes.append(f"kept tokens cover {_num(100 * vocab['corpus_coverage'], '{:.3f}%')} of corpus tokens")
        if notes:
            out.append("\n" + "; ".join(notes).capitalize() + ".\n")

    quality = rep.get("quality")
    if quality:
        out.append("\n## Quality on held-out text\n\nBits per UTF-8 byte (lower is better; comparable across ")
        out.append("tokenizers) and perplexity.\n\n")
        out.append("| language | bpb original | bpb converted (PyTorch) | bpb artifact (ONNX) | change | ppl original | ppl artifact |\n")
        out.append("|---|---:|---:|---:|---:|---:|---:|\n")
        for code, q in quality.items():
            art = q.get("artifact", q["converted"])
            out.append(
                f"| {code} | {_num(q['original']['bpb'])} | {_num(q['converted']['bpb'])} | "
                f"{_num(q.get('artifact', {}).get('bpb'))} | {_num(100 * q['bpb_increase'], '{:+.1f}%')} | "
                f"{_num(q['original']['ppl'], '{:.2f}')} | {_num(art['ppl'], '{:.2f}')} |\n"
            )
        out.append(_image(rep, "quality", "Bits per byte per language, original and converted"))

    out.append(_lm_eval_section(rep.get("lm_eval")))

    tok = rep.get("tokenizer")
    if tok:
        out.append("\n## Tokenizer\n\n| language | target | parity | round trip | tokens/char before | after |")
        out.append(" byte fallback after |\n|---|---|---:|---:|---:|---:|---:|\n")
        for code, t in tok.items():
            par = t.get("parity")
            par_s = f"{par['identical']}/{par['docs']}" if par else "—"
            if par and not par.get("gated", True):
                par_s += " (corpus tokens only; not gated)"
            rt = t["round_trip"]
            out.append(
                f"| {code} | {'yes' if t['target'] else 'control'} | {par_s} | {rt['identical']}/{rt['docs']} | "
                f"{_num(t['before']['tokens_per_char'])} | {_num(t['after']['tokens_per_char'])} | "
                f"{_num(100 * t['after'].get('byte_fallback_share', float('nan')), '{:.1f}%')} |\n"
            )
        out.append(_image(rep, "tokens_per_char", "Tokens per character per language, original and trimmed tokenizer"))

    onnx = rep.get("onnx")
    if onnx:
        out.append("\n## ONNX parity\n\n")
        out.append(f"- float export vs PyTorch: max |Δlogit| {_num(onnx['max_abs_logit_diff_float'], '{:.2e}')}, ")
        out.append(f"top-1 agreement {_num(100 * onnx['top1_agreement_float'], '{:.2f}%')} over {onnx['positions']} positions\n")
        kind = onnx.get("runtime", "onnxruntime")
        out.append(f"- shipped artifact ({'quantized' if onnx['quantized'] else 'float'}, run in {kind}) top-1 ")
        out.append(f"agreement {_num(100 * onnx['top1_agreement_artifact'], '{:.2f}%')}")
        if onnx.get("long_prompt_tokens"):
            out.append(f" (including a {onnx['long_prompt_tokens']}-token window)")
        out.append("\n")
        lm = onnx.get("artifact_lead_moved")
        if lm:
            out.append(
                f"- how far the shipped artifact moves PyTorch's lead of its top-1 over the runner-up (the noise the "
                f"greedy gates' near-tie margin has to cover): median {lm['median']:.3f}, 90th percentile "
                f"{lm['p90']:.3f}, 99th {lm['p99']:.3f}, max {lm['max']:.3f} logits over {lm['positions']} positions\n"
            )
        for label, g in (onnx.get("greedy") or {}).items():
            parts = []
            for key, name in (("onnx_float", "float ONNX"), ("onnx_artifact", "artifact")):
                if key in g:
                    same = next((i for i, (a, b) in enumerate(zip(g["torch"], g[key])) if a != b), len(g[key]))
                    part = f"{name} {same}/{len(g['torch'])} equal"
                    margins = g.get("torch_top2_margins") or []
                    if same < len(g["torch"]) and same < len(margins):
                        part += f" (PyTorch's top-1 led by {margins[same]:.3f} logits at token {same + 1})"
                    parts.append(part)
            out.append(
                f"- greedy tokens with KV cache after a {g['prompt_tokens']}-token {label} prompt: "
                + ", ".join(parts) + "\n"
            )

    speed = rep.get("speed")
    if speed:
        out.append("\n## Speed (same machine, same prompts, greedy decode with KV cache, after warm-up)\n\n")
        out.append("| | decode tokens/s | time to first token |\n|---|---:|---:|\n")
        for key, label in (("original_torch", "original, PyTorch"), ("artifact_onnx", f"artifact, {speed.get('artifact_onnx', {}).get('runtime', 'onnxruntime')}")):
            if key in speed:
                s = speed[key]
                out.append(f"| {label} | {_num(s['tokens_per_s'], '{:.1f}')} | {_num(1000 * s['ttft_s'], '{:.1f}')} ms |\n")
        out.append(f"\n{speed.get('note', '')}\n")

    prune = rep.get("prune")
    ffn = (prune or {}).get("ffn")
    if ffn:
        out.append(
            f"\n## Pruning: FFN experts ({ffn['selection']}, {ffn['experts']} experts per layer, refit "
            f"{'on' if ffn['refit'] else 'off'})\n\nWidth {ffn['width_before']} -> {ffn['width_after']} in every "
            "layer. Reconstruction error: Σ‖A Wᵀ − A_K W'ᵀ‖² over calibration tokens relative to the FFN output's "
            "energy, with the removed neurons simply dropped and after the least-squares refit.\n\n"
            "| layer | kept | error, dropped | error, refit |\n|---:|---:|---:|---:|\n"
        )
        for layer, st in ffn["layers"].items():
            out.append(f"| {layer} | {st['kept']} | {st['error_removed']:.4f} | {st['error_refit']:.4f} |\n")
        out.append(_image(rep, "ffn_width", "FFN width kept per layer"))
    elif prune and prune.get("per_layer"):
        out.append("\n## Pruning: measured sparsity per layer\n\n| layer | sparsity |\n|---:|---:|\n")
        for layer, linears in prune["per_layer"].items():
            vals = list(linears.values()) if isinstance(linears, dict) else [linears]
            mean = sum(vals) / len(vals) if vals else 0.0
            out.append(f"| {layer} | {100 * mean:.1f}% |\n")
        out.append(_image(rep, "sparsity", "Measured sparsity per layer"))

    out.append("\n## Files\n\n| file | bytes | sha256 |\n|---|---:|---|\n")
    for path, f in data.get("files", {}).items():
        out.append(f"| {path} | {f['bytes']:,} | `{f['sha256'][:16]}…` |\n")
    out.append("\nFull numbers: `report.json`; provenance (recipe, versions, timings, checksums): `manifest.json`.\n")
    return "".join(out)


def write_report(m: Manifest) -> None:
    rep = build_report(m.data)
    rep["plots"] = write_plots(rep, m.work)
    m.data["files"] = m._checksums()  # so the report can list the model files (and the plots)
    (m.work / "report.json").write_text(
        json.dumps(_jsonable(rep), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (m.work / "report.md").write_text(render_markdown(rep, m.data), encoding="utf-8")
