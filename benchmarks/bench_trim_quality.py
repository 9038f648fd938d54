"""What vocabulary trimming alone costs a shared-script language, for several ``top_tokens`` or ``top_words``
budgets.

The recipe's model is loaded once and calibrated as the recipe says (``--set`` overrides apply, e.g.
``vocab.max_size=null`` to lift the cap); for each budget of the language's ``--policy`` (0: its corpus tokens
only; the other policy is switched off) a copy is trimmed by the pipeline's own ``trim_vocab`` (no pruning, no
quantization) and scored with validate's ``score_texts`` on the held-out documents of that language and of
``--also`` languages against the untrimmed model; held-out parity is validate's ``tokenizer_parity``.

    python benchmarks/bench_trim_quality.py                          # English in recipes/korean.yaml
    python benchmarks/bench_trim_quality.py --policy top_words --budgets 0,20000,50000 --also ko --write
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


def _labelled_file(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{spec!r} is not LABEL=PATH with an existing text file")
    return label, Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "korean.yaml"))
    ap.add_argument("--lang", default="en")
    ap.add_argument("--budgets", default="0,12000,16000,30000")
    ap.add_argument("--policy", choices=("top_tokens", "top_words"), default="top_tokens")
    ap.add_argument("--also", default="", help="Comma-separated languages also scored (e.g. ko).")
    ap.add_argument(
        "--texts",
        action="append",
        default=[],
        type=_labelled_file,
        help="LABEL=PATH: also score the first --text-lines non-empty lines of a text file, one document each.",
    )
    ap.add_argument("--text-lines", type=int, default=400, help="lines scored per --texts file (>= 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override KEY=VALUE.")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.text_lines < 1:
        ap.error("--text-lines must be at least 1")

    from converter.arch import Arch
    from converter.calibrate import calibrate
    from converter.load import load_model
    from converter.recipe import load_recipe
    from converter.validate import score_texts, tokenizer_parity, torch_logits_fn
    from converter.vocab import trim_vocab

    recipe = load_recipe(args.recipe, args.overrides)
    loaded = load_model(recipe.model, recipe.base_dir)
    calib = calibrate(
        loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources
    )
    langs = [args.lang, *[c for c in args.also.split(",") if c]]
    docs_of = {c: calib.languages[c].heldout_docs for c in langs}
    for label, path in args.texts:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        docs_of[label] = lines[: args.text_lines]
        langs.append(label)
    seq = recipe.validate_cfg.eval_seq_len
    base = {
        c: score_texts(torch_logits_fn(loaded.model), loaded.tokenizer, docs_of[c], seq)["bpb"] for c in langs
    }
    other = "top_words" if args.policy == "top_tokens" else "top_tokens"
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        trimmed = copy.copy(loaded)
        trimmed.model = copy.deepcopy(loaded.model)
        trimmed.arch = Arch.of(trimmed.model)
        c = copy.deepcopy(calib)
        setattr(c.languages[args.lang], args.policy, budget or None)
        setattr(c.languages[args.lang], other, None)
        res = trim_vocab(trimmed, c, recipe.vocab)
        fn = torch_logits_fn(trimmed.model)
        per = {}
        for code in langs:
            docs = docs_of[code]
            bpb = score_texts(fn, trimmed.tokenizer, docs, seq)["bpb"]
            par = tokenizer_parity(loaded.tokenizer, trimmed.tokenizer, res.token_map, docs)
            per[code] = (bpb, par["identical"], par["docs"])
        rows.append((budget, res.vocab_after, per))
        print(rows[-1], flush=True)
    sets = "".join(f" --set {o}" for o in args.overrides)
    also = f" --also {args.also}" if args.also else ""
    also += "".join(f" --texts {label}={path}" for label, path in args.texts) + (
        f" --text-lines {args.text_lines}" if args.texts else ""
    )
    lines = [
        f"### Trimming alone, `{args.lang}` in {Path(args.recipe).name} ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_trim_quality.py --lang {args.lang} --policy {args.policy} --budgets "
        f"{args.budgets}{also}{sets}`: the recipe's vocabulary policies with `{args.lang}`'s `{args.policy}` set "
        f"to each budget (0: corpus tokens only) and `{other}` off, no pruning or quantization; bits per byte on "
        f"the held-out documents (and the --texts files' lines) against the untrimmed model ("
        + ", ".join(f"{k} {v:.4f}" for k, v in base.items())
        + ").",
        "",
        f"| {args.policy} | vocabulary | "
        + " | ".join(f"{k} bits per byte | {k} change | {k} documents tokenized as before" for k in langs)
        + " |",
        "|---:|---:|" + "---:|---:|---:|" * len(langs),
    ]
    for budget, vocab, per in rows:
        cells = " | ".join(
            f"{bpb:.4f} | {100 * (bpb / base[k] - 1):+.2f}% | {same}/{n}" for k, (bpb, same, n) in per.items()
        )
        lines.append(f"| {budget:,} | {vocab:,} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
