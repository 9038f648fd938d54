"""What vocabulary trimming alone costs a shared-script language, for several ``top_tokens`` budgets.

The recipe's model is loaded once and calibrated as the recipe says; for each budget of the language's
``top_tokens`` (0: its corpus tokens only) a copy is trimmed by the pipeline's own ``trim_vocab`` (no pruning, no
quantization, ``vocab.max_size`` lifted so the budget is not capped) and scored with validate's ``score_texts``
on that language's held-out documents against the untrimmed model; held-out parity is validate's
``tokenizer_parity``.

    python benchmarks/bench_trim_quality.py                          # English in recipes/korean.yaml
    python benchmarks/bench_trim_quality.py --lang en --budgets 0,12000,16000,30000 --write
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "RESULTS.md"
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "korean.yaml"))
    ap.add_argument("--lang", default="en")
    ap.add_argument("--budgets", default="0,12000,16000,30000")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from converter.arch import Arch
    from converter.calibrate import calibrate
    from converter.load import load_model
    from converter.recipe import load_recipe
    from converter.validate import score_texts, tokenizer_parity, torch_logits_fn
    from converter.vocab import trim_vocab

    recipe = load_recipe(args.recipe, ["vocab.max_size=null"])
    loaded = load_model(recipe.model, recipe.base_dir)
    calib = calibrate(loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources)
    docs = calib.languages[args.lang].heldout_docs
    base = score_texts(torch_logits_fn(loaded.model), loaded.tokenizer, docs, recipe.validate_cfg.eval_seq_len)["bpb"]
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        trimmed = copy.copy(loaded)
        trimmed.model = copy.deepcopy(loaded.model)
        trimmed.arch = Arch.of(trimmed.model)
        c = copy.deepcopy(calib)
        c.languages[args.lang].top_tokens = budget or None
        res = trim_vocab(trimmed, c, recipe.vocab)
        bpb = score_texts(torch_logits_fn(trimmed.model), trimmed.tokenizer, docs, recipe.validate_cfg.eval_seq_len)["bpb"]
        par = tokenizer_parity(loaded.tokenizer, trimmed.tokenizer, res.token_map, docs)
        rows.append((budget, res.vocab_after, bpb, par["identical"], par["docs"]))
        print(rows[-1], flush=True)
    lines = [
        f"### Trimming alone, `{args.lang}` in {Path(args.recipe).name} ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_trim_quality.py --lang {args.lang} --budgets {args.budgets}`: the recipe's "
        f"vocabulary policies with `{args.lang}`'s `top_tokens` set to each budget (0: corpus tokens only), no "
        f"pruning or quantization, `vocab.max_size` lifted; bits per byte on {len(docs)} held-out documents "
        f"against the untrimmed model ({base:.4f}).",
        "",
        "| top_tokens | vocabulary | bits per byte | change | held-out documents tokenized as before |",
        "|---:|---:|---:|---:|---:|",
    ]
    for budget, vocab, bpb, same, n in rows:
        lines.append(f"| {budget:,} | {vocab:,} | {bpb:.4f} | {100 * (bpb / base - 1):+.2f}% | {same}/{n} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
