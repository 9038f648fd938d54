"""validate.lm_eval on a shipped release without re-running the recipe: the original model of RECIPE and the
converted PyTorch checkpoint of its release, scored by the same code validate uses (``lm_eval_hook``).

    .venv/bin/python benchmarks/bench_lm_eval.py recipes/korean.yaml dist/gemma3-270m-ko/model \\
        --tasks next_sentence:ko,en --limit 200

The built-in task's items come from the recipe's held-out split (and exclude its calibration text), exactly as
a run with ``validate.lm_eval`` builds them. Prints a markdown table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("converted", type=Path, help="the release's model/ directory")
    ap.add_argument("--tasks", default="next_sentence", help="validate.lm_eval.tasks entries separated by ';' (an entry may hold commas)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from converter.calibrate import calibrate
    from converter.lm_eval_hook import compare, prepare_lm_eval, run_suite
    from converter.load import load_model, load_saved
    from converter.recipe import load_recipe

    tasks = json.dumps(args.tasks.split(";"))
    recipe = load_recipe(
        args.recipe,
        [f"validate.lm_eval={{tasks: {tasks}, limit: {args.limit}, batch_size: {args.batch_size}}}"],
    )
    timings = {}
    t = time.perf_counter()
    original = load_model(recipe.model, recipe.base_dir)
    calib = calibrate(
        original.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources
    )
    with tempfile.TemporaryDirectory() as work:
        suite = prepare_lm_eval(recipe, calib, Path(work))
        timings["load_and_build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scores_a = run_suite(original.model, original.tokenizer, suite)
        timings["original_s"] = time.perf_counter() - t
        original.release_weights()
        del original
        t = time.perf_counter()
        converted = load_saved(args.converted, recipe.model)
        scores_b = run_suite(converted.model, converted.tokenizer, suite)
        timings["converted_s"] = time.perf_counter() - t
        metrics, checks = compare(scores_a, scores_b, suite)
    metrics["timings"] = timings
    print("| task | metric | items | original | converted | change |\n|---|---|---:|---:|---:|---:|")
    for name, row in metrics["tasks"].items():
        print(
            f"| {name} | {row['metric']} | {row['items']} | {row['original']:.3f} ± {row['stderr_original']:.3f} | "
            f"{row['converted']:.3f} ± {row['stderr_converted']:.3f} | {100 * row['delta']:+.1f} pts |"
        )
    for name, row in metrics["tasks"].items():
        other = {k: (row["original_scores"][k], row["converted_scores"][k]) for k in row["original_scores"]}
        print(f"{name}: " + ", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in other.items()))
    print(", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str) + "\n")


if __name__ == "__main__":
    main()
