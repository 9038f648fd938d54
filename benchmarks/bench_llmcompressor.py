"""langconvert's Wanda and SparseGPT against llm-compressor's, on the same windows and the same held-out text.

Both tools prune 50% of the weights of every linear in the decoder layers (unstructured, ranked per output row
for Wanda, per column block for SparseGPT; embeddings and the lm_head stay dense), layer by layer, each layer
calibrated on what the already-pruned layers before it produce. The comparison is kept fair this way:

* calibration: the windows langconvert's prune stage uses for the recipe (``converter.calibrate``) are computed
  once here, saved as token ids, and fed to llm-compressor's ``oneshot`` as a pre-tokenized dataset (no
  shuffling, the same number of windows and length, the recipe's ``prune.batch_size``); langconvert's own child
  computes its windows again and must find exactly the same ids;
* time: the wall time of the prune call alone (langconvert's ``prune``, llm-compressor's ``oneshot``), each run
  in its own process on the same number of threads, with the model loaded and the libraries imported before the
  clock starts; peak RSS is the child process's;
* quality: every pruned model is written as dense safetensors, loaded back into the original model here and
  scored with validate's ``score_texts`` (bits per UTF-8 byte) on the same held-out documents of every recipe
  language; the zeros in the decoder layers' linears are counted, and every other parameter is checked to be
  bit-identical to the original's.

llm-compressor runs in its own virtual environment (never langconvert's); create it as
benchmarks/llmcompressor-requirements.txt says. The vocabulary is not trimmed and nothing is quantized.

    python benchmarks/bench_llmcompressor.py                          # Gemma 3 270M, recipes/korean.yaml
    python benchmarks/bench_llmcompressor.py --heldout 24 --write     # append the table to RESULTS.md
    python benchmarks/bench_llmcompressor.py --model-dir /tmp/tiny-gemma3 --heldout 2 \\
        --set calibration.num_samples=8 --set calibration.seq_len=64  # another HF checkpoint, a quick run
    python benchmarks/bench_llmcompressor.py --check                  # parse and probe the environments only
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
LLMC_CHILD = HERE / "llmc_prune_child.py"
LLMC_PYTHON = REPO.parent / "bench-venvs" / "llmc" / "bin" / "python"
sys.path.insert(0, str(HERE))
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)
from bench_pruning import CONFIGS  # noqa: E402  (langconvert's prune settings of each configuration)

# configuration -> llm-compressor modifier doing the same method
# (the -bf16 ones: langconvert with prune.compute_dtype bfloat16; llm-compressor, which computes in the model's
# dtype, on the model loaded in bfloat16)
METHODS = {
    "wanda50": "wanda",
    "sparsegpt50": "sparsegpt",
    "wanda50-bf16": "wanda",
    "sparsegpt50-bf16": "sparsegpt",
}
# langconvert-only variants (prune.propagate: dense), compared with llm-compressor's run of the base configuration
VARIANTS = {
    "wanda50-dense": "wanda50",
    "sparsegpt50-dense": "sparsegpt50",
    "wanda50-dense-bf16": "wanda50-bf16",
    "sparsegpt50-dense-bf16": "sparsegpt50-bf16",
}
PRUNERS = ("langconvert", "llm-compressor")
_LLMC_PROBE = (
    "import json; from importlib.metadata import version; "
    "from llmcompressor import oneshot; "
    "from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier; "
    "print(json.dumps({p: version(p) for p in ('llmcompressor', 'compressed-tensors', 'torch', 'transformers')}))"
)


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"model.source={Path(args.model_dir).resolve()}"] if args.model_dir else []
    return extra + list(args.overrides)


def _prune_cfg(recipe: Any, name: str) -> Any:
    from converter.recipe import PruneConfig

    return PruneConfig(**{**recipe.prune.model_dump(), **CONFIGS[name]})


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps the
    high-water mark of the parent the child was forked from, here the process holding the original model)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(job_path: Path) -> None:
    """langconvert's prune in its own process: the recipe's windows (checked against the saved ones), timed."""
    job = json.loads(job_path.read_text())
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import load_file, save_file

    from converter.calibrate import calibrate
    from converter.load import load_model
    from converter.prune import prune
    from converter.recipe import load_recipe

    torch.set_num_threads(job["threads"])
    recipe = load_recipe(job["recipe"], job["overrides"])
    loaded = load_model(recipe.model, recipe.base_dir)
    calib = calibrate(
        loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources
    )
    saved = load_file(job["windows"])["input_ids"]
    if not torch.equal(calib.windows.long(), saved):
        raise SystemExit("langconvert's calibration windows differ from the ones given to llm-compressor")
    cfg = _prune_cfg(recipe, job["config"])
    rss_before = _peak_rss()
    t0 = time.perf_counter()
    res = prune(loaded, calib, cfg, "cpu")
    seconds = time.perf_counter() - t0
    rss = _peak_rss()
    state = {name: p.detach().contiguous() for name, p in loaded.model.named_parameters()}
    save_file(state, job["weights"])
    out = {
        "prune_seconds": seconds,
        "peak_rss": rss,
        "peak_rss_before_prune": rss_before,
        "headline": res.headline,
        "threads": torch.get_num_threads(),
    }
    job_path.with_suffix(".out.json").write_text(json.dumps(out))


def _probe_llmc(python: str) -> dict[str, str]:
    """The versions in llm-compressor's environment; fails with the fix when it is missing or broken."""
    if not Path(python).is_file():
        raise SystemExit(
            f"no llm-compressor environment at {python}; create it as benchmarks/llmcompressor-requirements.txt "
            "says, or pass --llmc-python"
        )
    proc = subprocess.run(
        [python, "-c", _LLMC_PROBE], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if proc.returncode:
        raise SystemExit(f"llm-compressor does not import in {python}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(args: argparse.Namespace) -> None:
    """Parse the recipe and every configuration, resolve the model and probe llm-compressor's environment."""
    sys.path.insert(0, str(REPO))
    from converter.load import resolve_source
    from converter.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    src = resolve_source(recipe.model.source, recipe.base_dir)
    if not isinstance(src, Path):
        raise SystemExit(
            f"model.source '{src}' is a Hub id; this benchmark needs a local checkpoint or GGUF file"
        )
    cal = recipe.calibration
    tok = recipe.model.tokenizer or "the checkpoint's own"
    print(f"model: {src}; tokenizer: {tok}")
    print(f"calibration: {cal.num_samples} windows of {cal.seq_len} tokens, seed {recipe.seed}")
    for name in args.configs.split(","):
        if name not in METHODS:
            raise SystemExit(f"unknown configuration '{name}'; choose from {', '.join(METHODS)}")
        cfg = _prune_cfg(recipe, name)
        print(
            f"{name}: ok (langconvert {cfg.method} {cfg.sparsity:g} {cfg.pattern}, batch {cfg.batch_size}; "
            f"llm-compressor {METHODS[name]} {cfg.sparsity:g} mask 0:0)"
        )
    print(f"llm-compressor environment: {_probe_llmc(args.llmc_python)}")


def _hash(t: Any) -> str:
    """A digest of a tensor's bytes (any dtype), to tell a bit-identical parameter from a changed one."""
    import torch

    return hashlib.blake2b(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _inspect(loaded: Any) -> tuple[dict[str, float], dict[str, str], list[Any]]:
    """Zeros in the decoder layers' linears (overall, lowest and highest linear), a hash of every other
    parameter, and the keep-mask of every decoder linear (layer order)."""
    arch = loaded.arch
    linear_weights = {}
    for layer in arch.decoder_layers():
        for lin in arch.prunable_linears(layer).values():
            linear_weights[id(lin.weight)] = lin.weight
    zeros = total = 0
    shares = []
    masks = []
    for w in linear_weights.values():
        keep = w.detach() != 0
        z = w.numel() - int(keep.sum())
        zeros += z
        total += w.numel()
        shares.append(z / w.numel())
        masks.append(keep)
    others = {name: _hash(p) for name, p in loaded.model.named_parameters() if id(p) not in linear_weights}
    sparsity = {
        "overall": zeros / total if total else 0.0,
        "min": min(shares, default=0.0),
        "max": max(shares, default=0.0),
        "linears": len(shares),
    }
    return sparsity, others, masks


def _agreement(a: list[Any], b: list[Any]) -> float:
    """Share of decoder-linear weights that two pruned models both keep or both zero."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / max(1, sum(x.numel() for x in a))


def _score(loaded: Any, docs: dict[str, list[str]], max_len: int) -> dict[str, float]:
    from converter.validate import score_texts, torch_logits_fn

    fn = torch_logits_fn(loaded.model)
    return {code: score_texts(fn, loaded.tokenizer, d, max_len)["bpb"] for code, d in docs.items()}


def _evaluate(
    recipe: Any, weights: Path, docs: dict[str, list[str]], base_others: dict[str, str]
) -> tuple[dict, list[Any]]:
    """Load the original, put the pruned parameters in, check what changed, score it; also the keep-masks."""
    from safetensors.torch import load_file

    from converter.load import load_model

    loaded = load_model(recipe.model, recipe.base_dir)
    model = loaded.model
    state = load_file(str(weights))
    params = {name for name, _ in model.named_parameters()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    lacking = sorted(set(missing) & params)  # tied duplicates and buffers are not parameters of their own
    if unexpected or lacking:
        raise SystemExit(f"{weights.name}: parameters not matching the model: {unexpected or lacking}")
    sparsity, others, masks = _inspect(loaded)
    changed = sorted(n for n, h in others.items() if base_others.get(n) != h)
    bpb = _score(loaded, docs, recipe.validate_cfg.eval_seq_len)
    del loaded, model, state
    gc.collect()
    return {"sparsity": sparsity, "changed_outside_linears": changed, "bpb": bpb}, masks


def _run(cmd: list[str], what: str) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see its output above")
    print(f"{what}: child done in {time.perf_counter() - t0:.0f}s", flush=True)


def render(rows: list[dict], base: dict, meta: dict, args: argparse.Namespace) -> str:
    langs = list(base["bpb"])
    lc_seconds = {r["config"]: r["prune_seconds"] for r in rows if r["pruner"] == "langconvert"}
    llmc_seconds = {r["config"]: r["prune_seconds"] for r in rows if r["pruner"] == "llm-compressor"}
    v = meta["llmc_versions"]
    lines = [
        f"### langconvert against llm-compressor: Wanda and SparseGPT 50% unstructured on {meta['model']} "
        f"({datetime.now(timezone.utc):%Y-%m-%d}, {_cpu()}, {os.cpu_count()} cores)",
        "",
        f"The same {meta['num_samples']} calibration windows of {meta['seq_len']} tokens (langconvert's for "
        f"{Path(args.recipe).name}) in both tools, batches of {meta['batch_size']}; bits per byte on "
        f"{args.heldout} held-out documents per language (float, untrimmed vocabulary), change against the "
        "original in parentheses. Sparsity: zeros among the weights of the decoder layers' linears (embeddings, "
        "lm_head and norms bit-identical to the original in every row"
        + ("" if not meta["changed"] else ", except where noted below")
        + "). Same mask: share of those weights that both tools keep or both zero. Prune s: wall time of the prune call alone (langconvert's `prune`, llm-compressor's `oneshot`), "
        f"each in its own process on {meta['threads']} threads; langconvert / llm-compressor: the ratio of "
        "those times for the same method (below 1: langconvert is faster). Peak RSS of the prune process, "
        "model loading included; in brackets the peak before the prune call. "
        f"llm-compressor {v['llmcompressor']} (compressed-tensors {v['compressed-tensors']}, torch "
        f"{v['torch']}, transformers {v['transformers']}); langconvert with torch {meta['torch']}, "
        f"transformers {meta['transformers']}.",
        "",
        "| configuration | pruner | sparsity | "
        + " | ".join(f"{c} bpb" for c in langs)
        + " | same mask | prune s | langconvert / llm-compressor | peak RSS MB |",
        "|---|---|---:|" + "---:|" * len(langs) + "---:|---:|---:|---:|",
    ]
    orig = " | ".join(f"{base['bpb'][c]:.3f}" for c in langs)
    lines.append(f"| original | - | {100 * base['sparsity']['overall']:.2f}% | {orig} | - | - | - | - |")
    for r in rows:
        cells = [f"{r['bpb'][c]:.3f} ({100 * (r['bpb'][c] / base['bpb'][c] - 1):+.1f}%)" for c in langs]
        ratio = ""
        if r["pruner"] == "langconvert" and r["config"] in llmc_seconds and llmc_seconds[r["config"]] > 0:
            ratio = f"{lc_seconds[r['config']] / llmc_seconds[r['config']]:.2f}"
        base_cfg = VARIANTS.get(r["config"])
        if r["pruner"] == "langconvert" and base_cfg in llmc_seconds and llmc_seconds[base_cfg] > 0:
            ratio = f"{lc_seconds[r['config']] / llmc_seconds[base_cfg]:.2f} (vs {base_cfg})"
        same = f"{100 * r['mask_agreement']:.1f}%" if "mask_agreement" in r else ""
        lines.append(
            f"| {r['config']} | {r['pruner']} | {100 * r['sparsity']['overall']:.2f}% | "
            + " | ".join(cells)
            + f" | {same} | {r['prune_seconds']:.{1 if r['prune_seconds'] >= 10 else 2}f} | {ratio} | {r['peak_rss'] / 1e6:,.0f} "
            f"({r['peak_rss_before_prune'] / 1e6:,.0f}) |"
        )
    for r in rows:
        if r["changed_outside_linears"]:
            lines.append(
                f"\n{r['config']} ({r['pruner']}) also changed: {', '.join(r['changed_outside_linears'][:8])}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "korean.yaml"))
    ap.add_argument(
        "--model-dir", help="an HF checkpoint directory to prune instead of the recipe's model.source"
    )
    ap.add_argument(
        "--configs",
        default=",".join([*METHODS, *VARIANTS]),
        help=f"subset of {','.join([*METHODS, *VARIANTS])} (a -dense variant runs langconvert only and is compared "
        "with llm-compressor's run of its base configuration, which must come first)",
    )
    ap.add_argument("--pruners", default=",".join(PRUNERS), help=f"subset of {','.join(PRUNERS)}")
    ap.add_argument("--heldout", type=int, default=24, help="held-out documents per language")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON), help="python of llm-compressor's environment")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument(
        "--check", action="store_true", help="parse the recipe, resolve the model, probe llm-compressor"
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.check:
        return check(args)
    configs = args.configs.split(",")
    pruners = args.pruners.split(",")
    for name in configs:
        if name not in METHODS and name not in VARIANTS:
            raise SystemExit(f"unknown configuration '{name}'; choose from {', '.join([*METHODS, *VARIANTS])}")
    for p in pruners:
        if p not in PRUNERS:
            raise SystemExit(f"unknown pruner '{p}'; choose from {', '.join(PRUNERS)}")
    llmc_versions = _probe_llmc(args.llmc_python) if "llm-compressor" in pruners else {}

    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    from safetensors.torch import save_file

    from converter.calibrate import calibrate
    from converter.load import load_model
    from converter.recipe import load_recipe

    torch.set_num_threads(args.threads)
    overrides = _overrides(args)
    recipe = load_recipe(args.recipe, overrides)
    t_all = time.perf_counter()
    loaded = load_model(recipe.model, recipe.base_dir)
    if loaded.checkpoint_dir is None:
        raise SystemExit("llm-compressor needs a local checkpoint; pass --model-dir or a local model.source")
    calib = calibrate(
        loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources
    )
    windows = calib.windows.long().contiguous()
    docs = {code: d.heldout_docs[: args.heldout] for code, d in calib.languages.items()}
    base_sparsity, base_others, _ = _inspect(loaded)
    base = {"bpb": _score(loaded, docs, recipe.validate_cfg.eval_seq_len), "sparsity": base_sparsity}
    print(f"original: {base}", flush=True)
    checkpoint = loaded.checkpoint_dir
    layer_classes = sorted({type(layer).__name__ for layer in loaded.arch.decoder_layers()})
    tokenizer_dir = loaded.tokenizer_dir or checkpoint
    loaded.release_weights()
    del loaded
    gc.collect()

    rows: list[dict] = []
    meta: dict[str, Any] = {
        "model": Path(args.model_dir).name if args.model_dir else f"{Path(args.recipe).name}'s model",
        "num_samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "batch_size": recipe.prune.batch_size,
        "threads": args.threads,
        "llmc_versions": llmc_versions
        or dict.fromkeys(("llmcompressor", "compressed-tensors", "torch", "transformers"), "-"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    llmc_masks: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llmc-") as tmp_s:
        tmp = Path(tmp_s)
        windows_path = tmp / "windows.safetensors"
        save_file({"input_ids": windows}, str(windows_path))
        for name in configs:
            cfg = _prune_cfg(recipe, name)
            meta["batch_size"] = cfg.batch_size
            masks: dict[str, list[Any]] = {}
            base_cfg = VARIANTS.get(name)
            if base_cfg in llmc_masks:  # llm-compressor's masks of the base configuration, for "same mask"
                masks["llm-compressor"] = llmc_masks[base_cfg]
            for pruner in pruners if base_cfg is None else [p for p in pruners if p == "langconvert"]:
                tag = f"{name}-{pruner}"
                job = tmp / f"{tag}.json"
                weights = tmp / f"{tag}.safetensors"
                if pruner == "langconvert":
                    spec = {
                        "recipe": args.recipe,
                        "overrides": overrides,
                        "config": name,
                        "windows": str(windows_path),
                        "weights": str(weights),
                        "threads": args.threads,
                    }
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(job)]
                else:
                    spec = {
                        "checkpoint": str(checkpoint),
                        "dtype": "bfloat16" if cfg.compute_dtype == "bfloat16" else recipe.model.dtype,
                        "tokenizer": str(tokenizer_dir),
                        "windows": str(windows_path),
                        "modifier": METHODS[name],
                        "sequential_targets": layer_classes,
                        "sparsity": cfg.sparsity,
                        "batch_size": cfg.batch_size,
                        "block_size": cfg.sparsegpt_blocksize,
                        "dampening_frac": cfg.sparsegpt_damp,
                        "weights": str(weights),
                        "threads": args.threads,
                    }
                    cmd = [args.llmc_python, str(LLMC_CHILD), str(job)]
                job.write_text(json.dumps(spec))
                _run(cmd, tag)
                row = {
                    "config": name,
                    "pruner": pruner,
                    **json.loads(job.with_suffix(".out.json").read_text()),
                }
                quality, masks[pruner] = _evaluate(recipe, weights, docs, base_others)
                row.update(quality)
                if len(masks) == 2:
                    row["mask_agreement"] = _agreement(*masks.values())
                if pruner == "llm-compressor":
                    llmc_masks[name] = masks[pruner]
                weights.unlink()
                meta["threads"] = row.get("threads", args.threads)
                rows.append(row)
                print(f"{tag}: {row}", flush=True)
    meta["changed"] = any(r["changed_outside_linears"] for r in rows)
    text = render(rows, base, meta, args)
    print(text)
    print(f"(whole run {time.perf_counter() - t_all:.0f}s)")
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
