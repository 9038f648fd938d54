"""int8 weights with and without ``export.int8_reduce_range`` on this machine's CPU, against the float export.

Takes a release's ``model/`` checkpoint, exports it to float ONNX once, quantizes it twice (7-bit weights, the
default, and full 8-bit weights) and measures, in one run: bits per byte on held-out Korean and English NTREX
lines (``converter.validate.score_texts``, the same scoring as the validate stage), top-1 agreement with the
float export, and greedy decode tokens/s with KV cache (``converter.ort.decode_speed_onnx``). The float export is
the baseline of every ratio. The outcome depends on the CPU: x86 without VNNI adds pairs of u8×s8 products in 16
bits, which saturates with 8-bit weights; the CPU flags are printed with the results.

    python benchmarks/bench_int8.py --release dist/gemma3-270m-ko [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from converter import ort  # noqa: E402
from converter.calibrate import read_documents, split_heldout  # noqa: E402
from converter.export import ONNX_NAME, export_onnx  # noqa: E402
from converter.export.quantize import quantize_dynamic_int8  # noqa: E402
from converter.recipe import ExportConfig  # noqa: E402
from converter.validate import onnx_logits_fn, score_texts  # noqa: E402

LANGS = {"ko": "newstest2019-ref.kor.txt", "en": "newstest2019-ref.eng-US.txt"}


def cpu_facts() -> tuple[str, str]:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return name, ", ".join(simd) or "none of avx2/avx512/vnni"


def top1_agreement(ref_dir: Path, dirs: dict[str, Path], tok, docs: list[str]) -> dict[str, float]:
    agree = {k: 0 for k in dirs}
    total = 0
    for doc in docs:
        enc = tok(doc, return_tensors="pt", truncation=True, max_length=128)
        ref = ort.onnx_logits(ref_dir, enc["input_ids"], enc["attention_mask"])[0].argmax(-1)
        total += ref.numel()
        for k, d in dirs.items():
            got = ort.onnx_logits(d, enc["input_ids"], enc["attention_mask"])[0].argmax(-1)
            agree[k] += int((got == ref).sum())
    return {k: v / total for k, v in agree.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", type=Path, required=True, help="release directory with model/")
    ap.add_argument("--docs", type=int, default=24, help="held-out lines per language")
    ap.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model_dir = args.release / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = {}
    for code, name in LANGS.items():
        _, held = split_heldout(read_documents(SHARED / "corpora" / "ntrex128" / name), 0.1)
        docs[code] = held[: args.docs]
    prompts = [tok(d, return_tensors="pt")["input_ids"][:, :32] for d in docs["ko"][:4]]

    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        export_onnx(model_dir, work / "float", ExportConfig(format="optimum", quantize="none"), work / "scratch")
        dirs = {"float": work / "float"}
        for label, rr in (("int8, 7-bit weights (reduce_range)", True), ("int8, 8-bit weights", False)):
            out = work / ("rr" if rr else "full")
            out.mkdir()
            for p in dirs["float"].iterdir():
                if p.is_file() and ".onnx" not in p.name:
                    shutil.copyfile(p, out / p.name)
            quantize_dynamic_int8(dirs["float"] / ONNX_NAME, out / ONNX_NAME, work / "scratch", reduce_range=rr)
            dirs[label] = out
        rows = {}
        for label, d in dirs.items():
            bpb = {code: score_texts(onnx_logits_fn(d), tok, ds, 256)["bpb"] for code, ds in docs.items()}
            speed = ort.decode_speed_onnx(d, prompts, 32, warmup=1)["tokens_per_s"]
            rows[label] = (bpb, speed)
            ort.clear_session_cache()
        agree = top1_agreement(dirs["float"], {k: v for k, v in dirs.items() if k != "float"}, tok, docs["ko"][:8])

    cpu, simd = cpu_facts()
    base_bpb, base_speed = rows["float"]
    lines = [
        f"## int8 weight range — {args.release.name} — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {cpu} ({simd}), {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}. Script: `python benchmarks/bench_int8.py --release {args.release}`. Bits per byte on "
        f"{args.docs} held-out NTREX lines per language; top-1 agreement with the float export on 8 Korean lines "
        "(≤128 tokens); decode: 4 Korean prompts of 32 tokens, 32 greedy tokens each with KV cache, 1 warm-up.",
        "",
        "| ONNX | bpb ko | bpb en | × float (ko) | top-1 vs float | decode tok/s | × float |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (bpb, speed) in rows.items():
        top1 = "1.000" if label == "float" else f"{agree[label]:.3f}"
        lines.append(
            f"| {label} | {bpb['ko']:.3f} | {bpb['en']:.3f} | {bpb['ko'] / base_bpb['ko']:.2f}× | {top1} | "
            f"{speed:.1f} | {speed / base_speed:.2f}× |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
