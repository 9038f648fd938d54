"""Peak memory of a whole `langconvert` run against the model's size, for Llama-layout models of three sizes.

Each model is built from a config with random weights (seeded) and the real Llama 3 tokenizer from
``../shared/data/tokenizers/llama3`` (128,256 tokens), saved as a float32 safetensors checkpoint, and converted by
the CLI in its own process under ``/usr/bin/time -v``: structured FFN pruning by expert activation (an eighth of
the width), vocabulary trimming to Korean and English, onnxruntime-genai int8 export and validation (gates may
fail on random weights; the run's memory is what is measured). The table gives the process's peak RSS, its
ratio to the checkpoint's float32 bytes, the stage that peaked (from the manifest's per-stage peaks) and the wall
time. ``--limit-largest F`` then runs the largest model again inside a cgroup (v1 or v2, root only) whose memory
limit is F x its float32 bytes, which succeeds only if no stage holds the whole model in memory.
``--limit-each F`` runs every size again inside a cgroup of F x its float32 bytes: the memory a container
(whose limit is a cgroup's) must give the run, as against RSS, which also counts clean file pages (libraries, the
mapped checkpoint) that the kernel keeps while nothing presses on memory and reclaims when something does.

    python benchmarks/bench_scaling.py                       # the three sizes
    python benchmarks/bench_scaling.py --sizes S,M --write   # some, and append the table to RESULTS.md
    python benchmarks/bench_scaling.py --limit-largest 0.9 --write
    python benchmarks/bench_scaling.py --sizes XS,S,M --limit-each 2.5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(HERE))
RESULTS = HERE / "RESULTS.md"
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)

# name -> (hidden, layers, intermediate, heads, kv heads); head_dim 64, tied embedding, 128,256 tokens
SIZES = {
    "XS": (384, 8, 1536, 6, 2),  # ~66 M parameters: below the floor the libraries set (see FLOOR_NOTE)
    "S": (768, 12, 2048, 12, 4),  # ~174 M
    "M": (1024, 12, 3072, 16, 4),  # ~275 M
    "L": (2048, 16, 5632, 32, 8),  # ~0.98 B
}


FLOOR_NOTE = (
    "The floor: a process that imports what a run imports (torch, transformers' auto classes, onnxruntime, "
    "onnxruntime-genai, langconvert's pipeline) and loads the 128k-token tokenizer, with no model, peaks at "
    "{floor}; at 2.5x a model's float32 bytes that alone is a model of {floor_model}."
)


def floor_bytes() -> int:
    """Peak RSS of a process holding the libraries and the tokenizer of a run, but no model."""
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent across exec
    code = (
        "import torch, onnxruntime, onnxruntime_genai, converter.pipeline\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained({str(SHARED / 'tokenizers' / 'llama3')!r})\n"
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return int(out.stdout.split()[-1]) * 1024


def build(name: str, root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, inter, heads, kv = SIZES[name]
    ckpt = root / f"llama-{name}"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128_256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=128_000,
        eos_token_id=128_001,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    for p in model.parameters():  # small random weights keep activations finite through every layer
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(ckpt, safe_serialization=True)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (SHARED / "tokenizers" / "llama3" / f).is_file():
            shutil.copy(SHARED / "tokenizers" / "llama3" / f, ckpt / f)
    return ckpt


def recipe(ckpt: Path, out: Path) -> Path:
    import yaml

    ntrex = SHARED / "corpora" / "ntrex128"
    r = {
        "name": ckpt.name,
        "model": {"source": str(ckpt)},
        "languages": [
            {"code": "ko", "weight": 3, "sources": [str(ntrex / "newstest2019-ref.kor.txt")]},
            {"code": "en", "script_tokens": False, "sources": [str(ntrex / "newstest2019-ref.eng-US.txt")]},
        ],
        "calibration": {"num_samples": 16, "seq_len": 128, "max_heldout_docs": 8},
        "prune": {"method": "experts", "sparsity": 0.125, "experts": 64, "refit": True, "batch_size": 4},
        "vocab": {"min_count": 1},
        "export": {"format": "genai", "quantize": "int8", "block_size": 64},
        # random weights give near-uniform logits, whose top-1 int8 flips at near-ties: 0.9, not the default 0.98
        "validate": {
            "greedy_tokens": 4,
            "long_prompt_tokens": 0,
            "speed_prompts": 0,
            "eval_seq_len": 64,
            "onnx_min_top1_agreement": 0.9,
        },
        "output": {"dir": str(out), "overwrite": True},
    }
    p = out.parent / f"{ckpt.name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _cgroup(limit: int) -> tuple[Path, Path]:
    """A memory cgroup with ``limit`` bytes (v2 if mounted so, else v1); returns (its procs file, its dir)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file():
        d = Path("/sys/fs/cgroup/langconvert-bench")
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit))
        (d / "memory.swap.max").write_text("0")
        return d / "cgroup.procs", d
    d = Path("/sys/fs/cgroup/memory/langconvert-bench")
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(limit))
    (d / "memory.max_usage_in_bytes").write_text("0")
    return d / "cgroup.procs", d


def run(ckpt: Path, out: Path, limit: int | None = None) -> dict:
    rec = recipe(ckpt, out)
    for d in (out / ckpt.name, out / f"{ckpt.name}.failed"):  # a killed run must not report an older manifest
        shutil.rmtree(d, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", str(Path(sys.executable).with_name("langconvert")), str(rec)]
    group = None
    if limit is not None:
        procs, group = _cgroup(limit)
        cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    charged = None  # the cgroup's own peak: anonymous memory and the page cache charged to it
    if group is not None:
        for f in ("memory.peak", "memory.max_usage_in_bytes"):
            if (group / f).is_file():
                charged = int((group / f).read_text().split()[0])
                break
        try:
            group.rmdir()
        except OSError:
            pass
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak = int(m.group(1)) * 1024 if m else None
    man = None
    for d in (out / ckpt.name, out / f"{ckpt.name}.failed"):
        if (d / "manifest.json").is_file():
            man = json.loads((d / "manifest.json").read_text())
    stages = {s: e.get("peak_rss_mb") for s, e in (man or {}).get("stages", {}).items()}
    signal = re.search(r"Command terminated by signal (\d+)", proc.stderr)
    return {
        "exit": proc.returncode if not signal else -int(signal.group(1)),
        "peak": peak,
        "charged": charged,
        "wall": wall,
        "stages": stages,
        "status": (man or {}).get("status"),
        "tail": proc.stderr.strip().splitlines()[-25:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--work", default="/tmp/langconvert-scaling")
    ap.add_argument("--limit-largest", type=float, default=None, help="cgroup limit as a fraction of fp32 bytes")
    ap.add_argument(
        "--limit-each", type=float, default=None, help="also run every size in a cgroup of this fraction of fp32 bytes"
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    for opt in ("limit_largest", "limit_each"):
        v = getattr(args, opt)
        if v is not None and not v > 0:
            ap.error(f"--{opt.replace('_', '-')} must be a positive fraction of the model's float32 bytes, e.g. 2.5")
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [n for n in args.sizes.split(",") if n]
    for name in names:
        ckpt = build(name, root)
        model_bytes = (ckpt / "model.safetensors").stat().st_size
        r = run(ckpt, root / "dist")
        top = max(r["stages"].items(), key=lambda kv: kv[1] or 0)[0] if r["stages"] else "?"
        rows.append((name, model_bytes, r, top, None))
        print(name, model_bytes, r["exit"], r["peak"], f"{r['wall']:.0f}s", top, flush=True)
    dropped = False
    limited = [(n, args.limit_each) for n in names] if args.limit_each else []
    if args.limit_largest:
        limited.append((names[-1], args.limit_largest))
    for name, frac in limited:
        # Page cache is charged to the cgroup that first reads a page: drop it, so the checkpoint the earlier runs
        # read is charged to the limited run when it maps it, instead of riding free in the parent's group.
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
            dropped = True
        except OSError:
            dropped = False
        print("page cache dropped before the limited run:", dropped, flush=True)
        ckpt = root / f"llama-{name}"
        model_bytes = (ckpt / "model.safetensors").stat().st_size
        limit = int(frac * model_bytes)
        r = run(ckpt, root / "dist-limited", limit)
        last = [s for s, v in r["stages"].items()]
        top = max(r["stages"].items(), key=lambda kv: kv[1] or 0)[0] if r["stages"] and r["exit"] == 0 else "?"
        rows.append((name, model_bytes, r, top, limit))
        print("limited", name, limit, r["exit"], r["peak"], r["status"], last, flush=True)
        if r["exit"]:
            print("\n".join(r["tail"]))
    floor = floor_bytes()
    lines = [
        f"### Peak memory against model size, Llama layout, random weights ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_scaling.py --sizes {args.sizes}"
        + (f" --limit-largest {args.limit_largest}" if args.limit_largest else "")
        + (f" --limit-each {args.limit_each}" if args.limit_each else "")
        + "`: the whole CLI run (experts pruning 12.5%, ko+en vocabulary, genai int8 export, validation) per model "
        "in its own process; peak RSS from `/usr/bin/time -v`; the stage that peaked from the manifest; for the "
        "limited runs also the cgroup's own peak (its anonymous memory and the page cache charged to it; the page "
        "cache was dropped before each" + ("" if dropped or not limited else "; NOT here: drop_caches refused")
        + ").",
        "",
        "| model | parameters (fp32 bytes) | memory limit | exit | peak RSS | peak / model bytes | cgroup peak "
        "| stage at peak | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, model_bytes, r, top, limit in rows:
        peak = r["peak"] or 0
        lim = f"{limit / 2**30:.2f} GiB (cgroup)" if limit else "none"
        charged = f"{r['charged'] / 2**30:.2f} GiB" if r.get("charged") else "—"
        lines.append(
            f"| {name} | {model_bytes / 4 / 1e6:,.0f} M ({model_bytes / 2**30:.2f} GiB) | {lim} | {r['exit']} | "
            f"{peak / 2**30:.2f} GiB | {peak / model_bytes:.2f} | {charged} | {top} | {r['wall']:.0f} s |"
        )
    lines += [
        "",
        FLOOR_NOTE.format(
            floor=f"{floor / 2**30:.2f} GiB", floor_model=f"{floor / 2.5 / 4 / 1e6:,.0f} M parameters"
        ),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
