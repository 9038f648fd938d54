"""One llm-compressor prune, run by bench_llmcompressor.py in llm-compressor's own virtual environment.

Not for langconvert's project environment: this file imports only torch, transformers, datasets, safetensors and
llmcompressor (see benchmarks/llmcompressor-requirements.txt), never langconvert. It reads a job file written by
bench_llmcompressor.py:

    checkpoint   HF checkpoint directory (float weights) to load
    dtype        the dtype langconvert loads it in (the recipe's model.dtype, float32 by default)
    tokenizer    tokenizer directory handed to oneshot (the calibration data is already token ids)
    windows      safetensors file with "input_ids": (num_samples, seq_len) int64, langconvert's calibration windows
    modifier     "wanda" or "sparsegpt"
    sequential_targets   class names of the decoder layers, walked one at a time
    sparsity     fraction of weights zeroed per linear (0.5)
    batch_size   calibration windows per forward pass
    block_size, dampening_frac   SparseGPT settings (langconvert's prune.sparsegpt_blocksize / sparsegpt_damp)
    weights      where to write the pruned parameters (safetensors, dense, one entry per distinct parameter)

and writes ``<job>.out.json`` with the wall time of the ``oneshot`` call alone, the process's peak RSS before and
after it, and the installed versions.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss would keep the high-water mark of the parent this process was forked from)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    from importlib.metadata import version

    import datasets
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(job.get("threads") or os.cpu_count() or 1)
    dtype = getattr(torch, job.get("dtype", "float32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=dtype)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["tokenizer"])
    windows = load_file(job["windows"])["input_ids"]
    num_samples, seq_len = (int(s) for s in windows.shape)
    # Token ids as they are: no text column, so oneshot tokenizes nothing, and every window has the same length,
    # so the truncating collator cuts nothing.
    dataset = datasets.Dataset.from_dict({"input_ids": windows.tolist()})

    # The linears of the decoder layers: every Linear except the lm_head (tied to the embedding in Gemma 3);
    # embeddings are never pruned by these modifiers. The layer walk goes by the decoder layer class that
    # langconvert walks: left to itself, llm-compressor takes the model's _no_split_modules, which for Gemma 3's
    # text-only model also name the vision tower's classes and fail the lookup.
    common = {
        "sparsity": job["sparsity"],
        "mask_structure": "0:0",
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
        "sequential_targets": job["sequential_targets"],
    }
    if job["modifier"] == "wanda":
        modifier = WandaPruningModifier(**common)
    elif job["modifier"] == "sparsegpt":
        modifier = SparseGPTModifier(
            **common, block_size=job["block_size"], dampening_frac=job["dampening_frac"]
        )
    else:
        raise SystemExit(f"unknown modifier {job['modifier']!r}")

    rss_before = _peak_rss()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=job["batch_size"],
        pipeline="sequential",
    )
    seconds = time.perf_counter() - t0
    rss_after = _peak_rss()

    # named_parameters() lists a tied weight once (the embedding), so the file holds each tensor once.
    state = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    save_file(state, job["weights"])
    out = {
        "prune_seconds": seconds,
        "peak_rss": rss_after,
        "peak_rss_before_prune": rss_before,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")},
    }
    job_path.with_suffix(".out.json").write_text(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} JOB.json")
    main(Path(sys.argv[1]))
