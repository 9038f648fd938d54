"""Which decoder linears can go to 4 bits: each one's cost alone, and the cheapest set that saves enough bytes.

For a release's ``model/`` and its recipe's calibration windows: GPTQ int4 codes for every decoder linear
(the gptq stage's walk, block size and scale search from the recipe's export section), then, one linear at a
time, the converted PyTorch model with that linear replaced by its dequantized 4-bit codes (everything else
float) is run on ``--windows`` calibration windows, and the mean KL divergence of its next-token distribution
from the float model's is recorded, with its top-1 agreement. Linears are then taken in order of KL per byte
saved (int8 -> int4 halves a weight's code bytes) until ``--save-mb`` is reached, and the result is printed as
an ``export.linear_bits`` block for the recipe. Costs of several linears are assumed to add up; the release's
validation measures the set as a whole.

    python benchmarks/bench_quant_sensitivity.py --release dist/gemma3-270m-ko --save-mb 10.7 [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "RESULTS.md"
from bench_peers import _cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, default=REPO / "dist" / "gemma3-270m-ko")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows scored per linear")
    ap.add_argument("--seed", type=int, default=1, help="picks which calibration windows are scored")
    ap.add_argument("--save-mb", type=float, default=10.7, help="bytes the 4-bit linears must save, in MB")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from converter.calibrate import calibrate
    from converter.export.gptq import gptq_codes, weight_key
    from converter.export.quantize import dequantize
    from converter.load import load_saved
    from converter.recipe import recipe_from_dict

    torch.set_num_threads(os.cpu_count() or 1)
    man = json.loads((args.release / "manifest.json").read_text())
    recipe = recipe_from_dict(man["recipe"], Path(man.get("recipe_dir") or (REPO / "recipes")))
    loaded = load_saved(args.release / "model", recipe.model)
    calib = calibrate(loaded.tokenizer, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources)
    block = recipe.export.block_size
    cfg = recipe.export.model_copy(update={"quantize": "int4", "gptq": True, "linear_bits": {}})
    with tempfile.TemporaryDirectory(prefix="quant-sens-") as tmp:
        codes = gptq_codes(loaded, calib, cfg, "cpu", Path(tmp)).load()
    model = loaded.model.eval()
    pick = torch.randperm(calib.windows.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x = torch.as_tensor(calib.windows[pick[: args.windows]])
    with torch.no_grad():
        ref = model(x).logits.log_softmax(-1)
    rows = []  # (layer, linear, KL, top-1, bytes saved)
    for i, layer in enumerate(model.model.layers):
        for name, lin in layer.named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            w = lin.weight.data.clone()
            c, s = codes[weight_key(w.numpy().T)]
            lin.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(dequantize(c, s, w.shape[1], block).T)))
            with torch.no_grad():
                lp = model(x).logits.log_softmax(-1)
            lin.weight.data.copy_(w)
            kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
            top1 = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
            rows.append((i, name, kl, top1, w.numel() / 2))
            print(f"layer {i} {name}: KL {kl:.2e}, top-1 {top1:.4f}", flush=True)

    kinds = list(dict.fromkeys(n for _, n, *_ in rows))
    n_layers = max(i for i, *_ in rows) + 1
    kl_of = {(i, n): kl for i, n, kl, _, _ in rows}
    chosen, saved, total_kl = [], 0.0, 0.0
    for i, n, kl, _, b in sorted(rows, key=lambda r: r[2] / r[4]):
        if saved >= args.save_mb * 1e6:
            break
        chosen.append((i, n))
        saved += b
        total_kl += kl
    lines = [
        f"### Which linears can go to 4 bits: `{args.release.name}/model` ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{_cpu()}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_quant_sensitivity.py --release {args.release} --save-mb {args.save_mb}`: GPTQ "
        f"int4 codes (block {block}, {recipe.export.scale_search} scales) for every decoder linear from the "
        f"recipe's calibration windows; each linear alone replaced by its 4-bit codes in the float PyTorch model, "
        f"mean KL divergence (×10⁻⁴) of the next-token distribution from the float model's on {args.windows} "
        f"calibration windows of {x.shape[1]} tokens.",
        "",
        "| linear | " + " | ".join(str(i) for i in range(n_layers)) + " | mean |",
        "|---|" + "---:|" * (n_layers + 1),
    ]
    for n in kinds:
        vals = [kl_of[(i, n)] for i in range(n_layers)]
        lines.append(
            f"| {n} | " + " | ".join(f"{1e4 * v:.1f}" for v in vals) + f" | {1e4 * sum(vals) / len(vals):.1f} |"
        )
    lines += [
        "",
        f"Cheapest set by KL per byte saved: {len(chosen)} linears, {saved / 1e6:.2f} MB saved against int8, summed "
        f"KL {1e4 * total_kl:.1f} (every q_proj and o_proj: "
        f"{1e4 * sum(kl_of[(i, n)] for i in range(n_layers) for n in kinds if n.endswith(('q_proj', 'o_proj'))):.1f}).",
        "",
        "```yaml",
        "  linear_bits:",
    ]
    for n in kinds:
        for i in sorted(i for i, m in chosen if m == n):
            lines.append(f"    model.layers.{i}.{n}: 4")
    lines.append("```")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
