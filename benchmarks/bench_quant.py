"""Weight-only quantization choices on a release's own checkpoint, in one process, in onnxruntime-genai.

For each variant, ``export_onnx`` (format genai) writes the artifact from the release's ``model/``; then every
artifact is timed in turn, ``--repeats`` rounds interleaved so drift hits all alike (median kept), and scored:
bits per byte on the last ``--heldout`` NTREX lines of Korean and English (inside the Korean recipe's held-out
split) against the converted PyTorch model, with validate's ``score_texts``, and the share of those Korean
positions where the artifact's top-1 token is PyTorch's.

    python benchmarks/bench_quant.py --release dist/gemma3-270m-ko [--write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE))
from bench_peers import _cpu  # noqa: E402  (one description of the machine for every table)

NTREX = REPO.parent / "shared" / "data" / "corpora" / "ntrex128"

VARIANTS = {
    "float32": {"quantize": "none"},
    "int8 block 32": {"quantize": "int8", "block_size": 32},
    "int8 block 64": {"quantize": "int8", "block_size": 64},
    "int8 block 64, mse scales": {"quantize": "int8", "block_size": 64, "scale_search": "mse"},
    "int8 block 128": {"quantize": "int8", "block_size": 128},
    "int4 block 32": {"quantize": "int4", "block_size": 32},
    "int4 block 32, lm_head 8-bit": {"quantize": "int4", "block_size": 32, "lm_head_bits": 8},
    "int4 block 32, mse scales": {"quantize": "int4", "block_size": 32, "scale_search": "mse"},
    "int8 block 64, mse scales, GPTQ": {"quantize": "int8", "block_size": 64, "scale_search": "mse", "gptq": True},
    "int4 block 32, GPTQ": {"quantize": "int4", "block_size": 32, "gptq": True},
    "int4 block 32, lm_head 8-bit, GPTQ": {"quantize": "int4", "block_size": 32, "lm_head_bits": 8, "gptq": True},
    "int4 block 32, mse scales, lm_head 8-bit, GPTQ": {
        "quantize": "int4", "block_size": 32, "scale_search": "mse", "lm_head_bits": 8, "gptq": True
    },
    "int4 block 16, mse scales, lm_head 8-bit, GPTQ": {
        "quantize": "int4", "block_size": 16, "scale_search": "mse", "lm_head_bits": 8, "gptq": True
    },
}
# the lm_head (and with it a tied embedding) at 4 bits, the layers at 8: the largest single matrix of a trimmed model
VARIANTS["int8 block 64, mse scales, lm_head 4-bit"] = {
    "quantize": "int8", "block_size": 64, "scale_search": "mse", "lm_head_bits": 4
}
VARIANTS["int8 block 32, mse scales, lm_head 4-bit"] = {
    "quantize": "int8", "block_size": 32, "scale_search": "mse", "lm_head_bits": 4
}
# mixed precision (export.linear_bits): int8 block 64 with mse scales, one kind of linear at 4 bits in every layer
for _lin in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"):
    VARIANTS[f"int8 block 64, mse scales, {_lin.split('.')[-1]} int4"] = {
        "quantize": "int8", "block_size": 64, "scale_search": "mse", "linear_bits": {f"model.layers.*.{_lin}": 4}
    }
    VARIANTS[f"int8 block 64, mse scales, {_lin.split('.')[-1]} int4, GPTQ"] = {
        **VARIANTS[f"int8 block 64, mse scales, {_lin.split('.')[-1]} int4"], "gptq": True
    }

# attention projections at 4 bits with GPTQ codes, the rest int8
for _names in (("q_proj", "k_proj", "v_proj"), ("q_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")):
    VARIANTS[f"int8 block 64, mse scales, {'+'.join(_names)} int4, GPTQ"] = {
        "quantize": "int8", "block_size": 64, "scale_search": "mse", "gptq": True,
        "linear_bits": {f"model.layers.*.self_attn.{n}": 4 for n in _names},
    }

# the release's own export settings (its manifest's recipe), e.g. korean.yaml's mix of 8- and 4-bit linears
VARIANTS["the release's recipe"] = None


def _recipe_export(release: Path) -> dict:
    import json

    exp = json.loads((release / "manifest.json").read_text())["recipe"]["export"]
    keys = ("quantize", "block_size", "scale_search", "accuracy_level", "lm_head_bits", "gptq", "linear_bits")
    return {k: exp[k] for k in keys if k in exp}


def _gptq(release: Path, cfg, work: Path):
    """GPTQ codes for the release's model/ on its recipe's calibration windows (the recipe's own languages and
    seed, tokenized by the trimmed tokenizer; the held-out split stays unseen)."""
    import json

    from converter.calibrate import calibrate
    from converter.export.gptq import gptq_codes
    from converter.load import load_saved
    from converter.recipe import recipe_from_dict

    man = json.loads((release / "manifest.json").read_text())
    recipe = recipe_from_dict(man["recipe"], Path(man.get("recipe_dir") or (REPO / "recipes")))
    loaded = load_saved(release / "model", recipe.model)
    calib = calibrate(loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources)
    work.mkdir(parents=True, exist_ok=True)
    return gptq_codes(loaded, calib, cfg, "cpu", work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, default=REPO / "dist" / "gemma3-270m-ko")
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", help="subset of the variant names, separated by semicolons (default: all)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(";")} if args.variants else VARIANTS

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter.export import export_onnx
    from converter.recipe import ExportConfig
    from converter.runtime import GenaiDecoder, artifact_logits_fn
    from converter.validate import score_texts, torch_logits_fn

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = args.release / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = {
        "ko": (NTREX / "newstest2019-ref.kor.txt").read_text(encoding="utf-8").splitlines(),
        "en": (NTREX / "newstest2019-ref.eng-US.txt").read_text(encoding="utf-8").splitlines(),
    }
    heldout = {c: ls[-args.heldout :] for c, ls in texts.items()}
    prompts = [tok(t)["input_ids"][:32] for t in texts["ko"][-args.heldout - 4 : -args.heldout]]
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = {c: score_texts(torch_logits_fn(ref_model), tok, d, 256)["bpb"] for c, d in heldout.items()}
    ko_ids = [e[:256] for e in tok(heldout["ko"])["input_ids"]]
    with torch.no_grad():
        ref_top1 = [ref_model(torch.tensor([e])).logits[0].argmax(-1) for e in ko_ids]
    del ref_model
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        decs, sizes, bpb, top1 = {}, {}, {}, {}
        for name, opts in variants.items():
            out = Path(tmp) / str(len(decs))
            cfg = ExportConfig(context_length=2048, **(opts if opts is not None else _recipe_export(args.release)))
            codes = _gptq(args.release, cfg, out) if cfg.gptq else None
            res = export_onnx(model_dir, out / "onnx", cfg, out / "w", gptq=codes)
            shutil.rmtree(out / "w", ignore_errors=True)
            sizes[name] = res.bytes
            decs[name] = GenaiDecoder(res.onnx_dir, max_length=2048)
            bpb[name] = {c: score_texts(artifact_logits_fn(decs[name]), tok, d, 256)["bpb"] for c, d in heldout.items()}
            same = sum(
                int((torch.from_numpy(decs[name].logits(e)).argmax(-1) == r).sum()) for e, r in zip(ko_ids, ref_top1)
            )
            top1[name] = same / sum(len(e) for e in ko_ids)
        speed = {name: [] for name in decs}
        for _ in range(args.repeats):
            for name, dec in decs.items():
                speed[name].append(dec.decode_speed(prompts, args.new_tokens)["tokens_per_s"])
    base = statistics.median(speed["float32"])
    lines = [
        f"### Weight-only quantization of `{args.release.name}/model` ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_quant.py --release {args.release}`: genai exports of the release's checkpoint, "
        f"decode tok/s the median of {args.repeats} interleaved rounds (4 Korean prompts of 32 tokens, "
        f"{args.new_tokens} greedy tokens), bits per byte on {args.heldout} held-out NTREX lines against the "
        f"converted PyTorch model (ko {ref['ko']:.4f}, en {ref['en']:.4f}).",
        "",
        "| variant | weights MB | decode tok/s | × float32 | ko bpb | vs PyTorch | en bpb | vs PyTorch | ko top-1 = PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in decs:
        tps = statistics.median(speed[name])
        b = bpb[name]
        lines.append(
            f"| {name} | {sizes[name] / 1e6:,.1f} | {tps:.1f} | {tps / base:.2f} | {b['ko']:.4f} | "
            f"{100 * (b['ko'] / ref['ko'] - 1):+.2f}% | {b['en']:.4f} | {100 * (b['en'] / ref['en'] - 1):+.2f}% | "
            f"{100 * top1[name]:.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
