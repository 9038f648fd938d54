"""Pruning methods side by side on one model, same calibration and held-out text, one run (DESIGN.md rule 9).

For each configuration a fresh copy of the model is loaded, pruned by langconvert's own ``prune`` stage with
the recipe's calibration windows, and scored with validate's ``score_texts`` (bits per UTF-8 byte) on the same
held-out documents of every recipe language (target and control). Wall time and peak RSS of the prune stage
are measured in a child process per configuration. The vocabulary is not trimmed and nothing is quantized, so
the numbers are pruning's own cost.

    python benchmarks/bench_pruning.py                        # Gemma 3 270M, recipes/korean.yaml's languages
    python benchmarks/bench_pruning.py --configs original,experts25 --heldout 24
    python benchmarks/bench_pruning.py --write                # append the table to RESULTS.md
    python benchmarks/bench_pruning.py --configs wanda50,wanda50-mt,wanda50-mt-contrast --check   # parse only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE))
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)

# name -> recipe overrides of the prune section
CONFIGS: dict[str, dict] = {
    "original": {"method": "none"},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    # one forward pass per layer: the next layer calibrates on the original model's activations
    "wanda50-dense": {"method": "wanda", "sparsity": 0.5, "propagate": "dense"},
    "sparsegpt50-dense": {"method": "sparsegpt", "sparsity": 0.5, "propagate": "dense"},
    # matrix products in bfloat16 (prune.compute_dtype): AMX CPUs and GPUs run them several times faster
    "wanda50-bf16": {"method": "wanda", "sparsity": 0.5, "compute_dtype": "bfloat16"},
    "sparsegpt50-bf16": {"method": "sparsegpt", "sparsity": 0.5, "compute_dtype": "bfloat16"},
    "wanda50-dense-bf16": {"method": "wanda", "sparsity": 0.5, "propagate": "dense", "compute_dtype": "bfloat16"},
    "sparsegpt50-dense-bf16": {
        "method": "sparsegpt", "sparsity": 0.5, "propagate": "dense", "compute_dtype": "bfloat16"
    },
    "experts25": {"method": "experts", "sparsity": 0.25, "expert_selection": "activation", "refit": True},
    "experts25-norefit": {"method": "experts", "sparsity": 0.25, "expert_selection": "activation", "refit": False},
    "random25": {"method": "experts", "sparsity": 0.25, "expert_selection": "random", "refit": True},
    "wandasp25": {"method": "experts", "sparsity": 0.25, "expert_selection": "wanda-sp", "refit": True},
    "experts125": {"method": "experts", "sparsity": 0.125, "expert_selection": "activation", "refit": True},
    "random125": {"method": "experts", "sparsity": 0.125, "expert_selection": "random", "refit": True},
    "recon125": {"method": "experts", "sparsity": 0.125, "expert_selection": "reconstruction", "refit": True},
    "recon25": {"method": "experts", "sparsity": 0.25, "expert_selection": "reconstruction", "refit": True},
    "neurons25": {
        "method": "experts", "sparsity": 0.25, "experts": 2048, "expert_selection": "reconstruction", "refit": True
    },
    "neurons375": {
        "method": "experts", "sparsity": 0.375, "experts": 2048, "expert_selection": "reconstruction", "refit": True
    },
    "neurons50": {
        "method": "experts", "sparsity": 0.5, "experts": 2048, "expert_selection": "reconstruction", "refit": True
    },
    "experts50": {"method": "experts", "sparsity": 0.5, "expert_selection": "activation", "refit": True},
    "random50": {"method": "experts", "sparsity": 0.5, "expert_selection": "random", "refit": True},
    # translation-prompt calibration (Kim et al. 2024): against wanda50 with the same 64 windows, half of them
    # 3-shot NTREX en-ko / ko-en prompts (RECIPE_SETS), with plain Wanda norms and with the contrast statistic
    "wanda50-mt": {"method": "wanda", "sparsity": 0.5},
    "wanda50-mt-contrast": {"method": "wanda", "sparsity": 0.5},
}

_NTREX = REPO.parent / "shared" / "data" / "corpora" / "ntrex128"


def _translation(contrast: bool) -> str:
    """calibration.translation as a --set value (YAML flow mapping): NTREX en/ko, en-ko and ko-en, 3 shots."""
    files = {"en": str(_NTREX / "newstest2019-ref.eng-US.txt"), "ko": str(_NTREX / "newstest2019-ref.kor.txt")}
    section = {"files": files, "directions": ["en-ko", "ko-en"], "shots": 3, "share": 0.5, "contrast": contrast}
    return "calibration.translation=" + json.dumps(section)  # JSON is YAML


# name -> recipe overrides (KEY=VALUE, as --set) for configurations that change more than the prune section;
# prune.method is set in the recipe too, because calibration.translation.contrast is validated against it
RECIPE_SETS: dict[str, list[str]] = {
    "wanda50-mt": ["prune.method=wanda", _translation(contrast=False)],
    "wanda50-mt-contrast": ["prune.method=wanda", _translation(contrast=True)],
}


def child(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    sys.path.insert(0, str(REPO))
    import torch

    from converter.calibrate import calibrate
    from converter.load import load_model
    from converter.prune import prune
    from converter.recipe import PruneConfig, load_recipe
    from converter.validate import score_texts, torch_logits_fn

    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(job["recipe"], job["overrides"] + job.get("sets", []))
    loaded = load_model(recipe.model, recipe.base_dir)
    calib = calibrate(
        loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources
    )
    cfg = PruneConfig(**{**recipe.prune.model_dump(), **job["prune"]})
    t0 = time.perf_counter()
    res = prune(loaded, calib, cfg, "cpu")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn = torch_logits_fn(loaded.model)
    quality = {}
    for code, d in calib.languages.items():
        docs = d.heldout_docs[: job["heldout"]]
        quality[code] = score_texts(fn, loaded.tokenizer, docs, recipe.validate_cfg.eval_seq_len)["bpb"]
    params = sum(p.numel() for p in loaded.model.parameters())
    out = {
        "bpb": quality,
        "prune_seconds": seconds,
        "peak_rss": rss,
        "params": params,
        "ffn_width": getattr(loaded.model.config, "intermediate_size", None),
        "headline": res.headline,
    }
    job_path.with_suffix(".out.json").write_text(json.dumps(out))


def check(args: argparse.Namespace) -> None:
    """Validate each configuration as its child would build it (recipe, prune section, parallel files)."""
    sys.path.insert(0, str(REPO))
    from converter.calibrate import read_parallel
    from converter.recipe import PruneConfig, load_recipe

    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration '{name}'; choose from {', '.join(CONFIGS)}")
        recipe = load_recipe(args.recipe, args.overrides + RECIPE_SETS.get(name, []))
        cfg = PruneConfig(**{**recipe.prune.model_dump(), **CONFIGS[name]})
        tr = recipe.calibration.translation
        note = ""
        if tr is not None:
            par = read_parallel(tr, recipe.calibration.heldout_fraction, recipe.resolve_sources)
            note = (
                f", {tr.num_windows(recipe.calibration.num_samples)} of {recipe.calibration.num_samples} windows "
                f"{tr.shots}-shot {'/'.join(f'{s}-{t}' for s, t in tr.pairs)} from {len(par.calib)} pairs"
                f"{', contrast' if tr.contrast else ''}"
            )
        print(f"{name}: ok ({cfg.method} {cfg.sparsity:g}{note})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "korean.yaml"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--heldout", type=int, default=48, help="held-out documents per language")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true", help="parse every configuration's recipe and data; run nothing")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.check:
        return check(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            job = Path(tmp) / f"{name}.json"
            job.write_text(
                json.dumps(
                    {
                        "recipe": args.recipe,
                        "overrides": args.overrides,
                        "sets": RECIPE_SETS.get(name, []),
                        "prune": CONFIGS[name],
                        "heldout": args.heldout,
                    }
                )
            )
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", str(job)], check=True)
            rows[name] = json.loads(job.with_suffix(".out.json").read_text())
            print(f"{name}: {rows[name]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    langs = list(next(iter(rows.values()))["bpb"])
    base = rows.get("original")
    lines = [
        f"### Pruning on {Path(args.recipe).name}'s model ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)\n",
        "",
        f"Bits per byte on {args.heldout} held-out documents per language (float, untrimmed vocabulary); "
        "change against the original in parentheses. Prune wall time and peak RSS of the prune child process.",
        "",
        "| configuration | FFN width | parameters | " + " | ".join(f"{c} bpb" for c in langs) + " | prune s | peak RSS MB |",
        "|---|---:|---:|" + "---:|" * len(langs) + "---:|---:|",
    ]
    for name, r in rows.items():
        cells = []
        for c in langs:
            v = r["bpb"][c]
            rel = f" ({100 * (v / base['bpb'][c] - 1):+.1f}%)" if base and name != "original" else ""
            cells.append(f"{v:.3f}{rel}")
        lines.append(
            f"| {name} | {r['ffn_width']} | {r['params'] / 1e6:.1f} M | " + " | ".join(cells)
            + f" | {r['prune_seconds']:.0f} | {r['peak_rss'] / 1e6:,.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
