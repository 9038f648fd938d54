"""Greedy decoding of an artifact against the converted PyTorch model, over many short prompts.

Validation checks greedy tokens after one short prompt (and one long one). This benchmark asks the same question
over every held-out document of a language: each document's first ``--prompt-tokens`` tokens (the beginning of
sequence token included, as validation builds its short prompt) are the prompt, PyTorch's ``model/`` generates
``--tokens`` greedy tokens with KV cache, and each artifact does the same in its own runtime (onnxruntime-genai
for a directory with genai_config.json, else onnxruntime). For every prompt it records how many tokens agree
before the first departure, and PyTorch's lead of its top-1 logit over the runner-up at that step (validation's
near-tie rule: a departure where that lead is below ``validate.greedy_tie_margin`` passes).

    python benchmarks/bench_greedy.py --release dist/gemma3-270m-ko
    python benchmarks/bench_greedy.py --release dist/gemma3-270m-ko --artifact int8=/tmp/x/onnx --write
    python benchmarks/bench_greedy.py --release dist/gemma3-270m-ko --ties 0.25   # pass counts at another margin

It also measures how far each artifact moves PyTorch's lead of its top-1 over the runner-up along PyTorch's
greedy paths (median, 90th and 99th percentile, max): the noise a near-tie margin has to cover.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "RESULTS.md"
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)


def _labelled_dir(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{spec!r} is not LABEL=ONNX_DIR with an existing directory")
    return label, Path(path)


def _margins(spec: str) -> list[float]:
    try:
        out = [float(t) for t in spec.split(",") if t]
    except ValueError:
        out = [-1.0]
    if any(t < 0 for t in out):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not a comma-separated list of margins >= 0, e.g. 0.25,0.4"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, default=REPO / "dist" / "gemma3-270m-ko")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "korean.yaml"))
    ap.add_argument("--lang", default="ko")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument(
        "--prompt-tokens", type=int, default=16, help="prompt length, beginning of sequence included"
    )
    ap.add_argument(
        "--artifact",
        action="append",
        default=[],
        type=_labelled_dir,
        help="LABEL=ONNX_DIR, another artifact of the same model/",
    )
    ap.add_argument(
        "--ties",
        type=_margins,
        default=[],
        help="comma-separated near-tie margins to count passes at, besides the recipe's (e.g. 0.25)",
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter import ort
    from converter.calibrate import calibrate
    from converter.recipe import load_recipe
    from converter.runtime import open_artifact
    from converter.validate import (
        dir_bytes,
        greedy_verdict,
        lead_moved,
        lead_moved_stats,
        top2_lead,
        torch_logits_fn,
    )

    recipe = load_recipe(args.recipe, [])
    tie = recipe.validate_cfg.greedy_tie_margin
    tok = AutoTokenizer.from_pretrained(args.release / "model")
    calib = calibrate(tok, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources)
    docs = calib.languages[args.lang].heldout_docs
    prompts = [e[: args.prompt_tokens] for e in tok(docs, add_special_tokens=True)["input_ids"]]
    prompts = [p for p in prompts if len(p) == args.prompt_tokens]
    model = AutoModelForCausalLM.from_pretrained(args.release / "model", dtype=torch.float32).eval()
    fn = torch_logits_fn(model)
    refs = [ort.greedy_generate_torch(model, torch.tensor([p]), args.tokens) for p in prompts]
    # one forward over each prompt and its greedy tokens: PyTorch's top-1 and runner-up at every step and its
    # lead (validate.greedy_margins' numbers), which the near-tie rule reads and each artifact may move
    top2, leads_ref = [], []
    for p, g in zip(prompts, refs, strict=True):
        ids = torch.tensor([p + g[:-1]])
        with torch.no_grad():
            t2, lead = top2_lead(fn(ids, torch.ones_like(ids))[0, len(p) - 1 :].float())
        top2.append(t2)
        leads_ref.append(lead)
    margins = [lead.tolist() for lead in leads_ref]
    del model, fn
    ties = [tie] + [t for t in args.ties if t != tie]
    steps = [x for m in margins for x in m]
    close = sum(x < tie for x in steps)
    with_tie = sum(min(m) < tie for m in margins)

    arts = [("release", args.release / "onnx"), *args.artifact]
    rows = []
    for label, onnx_dir in arts:
        art = open_artifact(onnx_dir)
        equal, passed, leads, moved = [], [0] * len(ties), [], []
        for p, g, m, t2, lead in zip(prompts, refs, margins, top2, leads_ref, strict=True):
            got = art.greedy(p, args.tokens)
            for j, t in enumerate(ties):
                passed[j] += greedy_verdict(g, got, m, t)[0]
            k = next((i for i, (a, b) in enumerate(zip(g, got)) if a != b), min(len(g), len(got)))
            equal.append(k)
            if got != g and k < len(m):
                leads.append(m[k])
            # the artifact's logits (one prefill) along PyTorch's path, at PyTorch's top-1 and runner-up
            moved.append(lead_moved(lead, t2, torch.from_numpy(art.logits(p + g[:-1])[len(p) - 1 :])))
        del art
        rows.append(
            (label, dir_bytes(onnx_dir, "*.onnx*"), equal, passed, leads, lead_moved_stats(torch.cat(moved)))
        )
        print(label, sum(e == args.tokens for e in equal), passed, statistics.mean(equal), flush=True)

    n = len(prompts)
    lines = [
        f"### Greedy tokens over {n} short prompts, `{args.release.name}` ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_greedy.py --release {args.release}"
        + "".join(f" --artifact {a}={d}" for a, d in args.artifact)
        + (" --ties " + ",".join(f"{t:g}" for t in args.ties) if args.ties else "")
        + f"`: the first {args.prompt_tokens} tokens of each of the {n} held-out `{args.lang}` documents that have "
        f"as many (beginning of sequence included) as the prompt, {args.tokens} greedy tokens with KV cache from "
        "the converted PyTorch model and from each artifact in its own runtime. PyTorch's own top-1 led the "
        f"runner-up by less than {tie:g} logits at {close} of its {len(steps)} steps, in {with_tie} of the {n} "
        "prompts.",
        "",
        f"| artifact | weights MB | all {args.tokens} tokens equal | "
        + " | ".join(f"passes the near-tie rule at < {t:g}" for t in ties)
        + " | mean tokens equal before the first departure | PyTorch's lead at departures: median, max "
        "| lead moved: median, 90th, 99th percentile, max |",
        "|---|---:|---:|" + "---:|" * len(ties) + "---:|---:|---:|",
    ]
    for label, size, equal, passed, leads, moved in rows:
        full = sum(e == args.tokens for e in equal)
        lead = f"{statistics.median(leads):.3f}, {max(leads):.3f}" if leads else "—"
        lines.append(
            f"| {label} | {size / 1e6:.1f} | {full}/{n} | "
            + " | ".join(f"{x}/{n}" for x in passed)
            + f" | {statistics.mean(equal):.2f} | {lead} | "
            + f"{moved['median']:.3f}, {moved['p90']:.3f}, {moved['p99']:.3f}, {moved['max']:.3f} |"
        )
    lines += [
        "",
        "Lead moved: at each of PyTorch's greedy steps, |PyTorch's top-1 minus runner-up logit - the artifact's "
        "logit difference for the same two tokens|, the artifact run once over the prompt and PyTorch's tokens.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
