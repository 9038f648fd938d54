"""End to end on a tiny Gemma 3 model with the real Gemma 3 tokenizer and real corpora, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import CORPORA, TOKENIZERS, require_shared, tiny_model
from test_report import assert_png, linked_images

from converter.cli import main
from converter.manifest import sha256_file


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    require_shared()
    d = tmp_path_factory.mktemp("ckpt") / "tiny-gemma3"
    model = tiny_model("gemma3_text", vocab_size=262_144, tie=True)
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "gemma3" / f, d / f)
    return d


def tiny_recipe(tmp: Path, ckpt: Path, **over) -> Path:
    ntrex = CORPORA / "ntrex128"
    recipe = {
        "name": "tiny-ko",
        "model": {"source": str(ckpt)},
        "languages": [
            {"code": "ko", "weight": 3, "sources": [str(ntrex / "newstest2019-ref.kor.txt")]},
            {
                "code": "en",
                "script_tokens": False,
                "top_tokens": 500,
                "sources": [str(ntrex / "newstest2019-ref.eng-US.txt")],
            },
            {"code": "uk", "calibrate": False, "keep_vocab": False, "sources": [str(ntrex / "newstest2019-ref.ukr.txt")]},
        ],
        "calibration": {"num_samples": 8, "seq_len": 32, "max_heldout_docs": 12},
        "prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4},
        "vocab": {"min_count": 1},
        "export": {"quantize": "none"},
        # a 100-token long prompt: past the tiny model's 16-token sliding window
        "validate": {
            "greedy_tokens": 8,
            "long_prompt_tokens": 100,
            "speed_prompts": 1,
            "speed_new_tokens": 4,
            "eval_seq_len": 48,
        },
        "output": {"dir": str(tmp / "dist")},
    }
    for key, value in over.items():
        recipe[key] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def release(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    recipe = tiny_recipe(tmp, tiny_ckpt)
    # What a killed run leaves (its process is gone) and what a live concurrent run holds.
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp / "dist" / f".tiny-ko.tmp-{gone.pid}" / "model").mkdir(parents=True)
    (tmp / "dist" / f".tiny-ko.tmp-{os.getppid()}").mkdir()
    old_umask = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, [str(recipe)], catch_exceptions=False)
    finally:
        os.umask(old_umask)
    return tmp, recipe, result, gone.pid


def test_run_writes_complete_release(release):
    tmp, _, result, _ = release
    assert result.exit_code == 0, result.output
    out = tmp / "dist" / "tiny-ko"
    for rel in (
        "model/model.safetensors",
        "model/config.json",
        "model/generation_config.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "model/token_map.json",
        "onnx/model.onnx",
        "report.md",
        "report.json",
        "plots/quality.png",
        "plots/tokens_per_char.png",
        "plots/sparsity.png",
        "manifest.json",
    ):
        assert (out / rel).is_file(), rel
    assert not (tmp / "dist" / "tiny-ko.failed").exists()


def test_log_holds_only_langconvert_lines_once(release):
    """Without -v the output is langconvert's own: timestamped stage lines (each once), then the summary; no
    third-party warning, deprecation note, link or progress bar."""
    import re

    _, _, result, _ = release
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    stages = ("load", "calibrate", "reference", "prune", "trim_vocab", "save", "export", "validate")
    summary = re.compile(rf"^(stage +status|({'|'.join(stages)}) +ok |[✓✗·] |release written to )")
    log_lines = [ln for ln in lines if re.match(r"^\d\d:\d\d:\d\d ", ln)]
    assert [ln for ln in lines if ln not in log_lines and not summary.match(ln)] == []
    messages = [ln[9:] for ln in log_lines]
    assert len(messages) == len(set(messages)), messages
    for s in stages:
        assert sum(m.startswith(f"{s}: done in ") for m in messages) == 1, s
    noise = re.compile(r"warn|deprecat|https?://|it/s\]|%\|", re.IGNORECASE)
    assert [ln for ln in lines if noise.search(ln)] == []


def test_stale_work_dirs_go_live_ones_stay_and_modes_follow_the_umask(release):
    tmp, _, _, _ = release
    left = sorted(p.name for p in (tmp / "dist").iterdir() if p.name.startswith(".tiny-ko"))
    assert left == [f".tiny-ko.tmp-{os.getppid()}"]  # the killed run's directory was removed, the live one kept
    out = tmp / "dist" / "tiny-ko"
    for p in [out, *out.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_every_stage_records_its_peak_memory(release):
    tmp, _, _, _ = release
    out = tmp / "dist" / "tiny-ko"
    man = json.loads((out / "manifest.json").read_text())
    for name, st in man["stages"].items():
        assert st["peak_rss_mb"] > 50 and st["peak_rss_scope"] == "stage", name
        assert st["peak_rss_mb"] <= man["peak_rss_mb"], name  # the run's peak, as /usr/bin/time reports it
    assert "| peak RSS MB |" in (out / "report.md").read_text()


def test_stage_peaks_leave_the_process_peak_alone():
    """A stage's own peak, whether or not it raises the process's high-water mark, and that mark (what
    /usr/bin/time -v and getrusage report for the whole run) is never reset by the measurement."""
    import time

    import numpy as np

    from converter.manifest import _StagePeak, _status_kib

    mib = 2**20
    first = np.ones(400 * mib // 8)  # a high-water mark above what the next stage reaches
    del first
    hwm = _status_kib("VmHWM")
    start = _status_kib("VmRSS")
    stage = _StagePeak()
    second = np.ones(150 * mib // 8)
    time.sleep(0.1)
    del second
    peak, scope = stage.finish()
    assert scope == "stage"
    assert peak * 1024 >= start + 140 * 1024  # the sampler saw the 150 MiB the stage held
    assert peak * 1024 < hwm  # and not the earlier, higher mark
    assert _status_kib("VmHWM") >= hwm  # nothing reset it

    stage = _StagePeak()
    # enough to pass the old mark from where the process stands: the stage's peak is the new mark
    third = np.ones(((hwm - _status_kib("VmRSS")) // 1024 + 100) * mib // 8)
    del third
    peak, _ = stage.finish()
    # the kernel's counters lag by a few pages, so the sampled RSS may pass VmHWM by a fraction of a MiB
    assert abs(peak - _status_kib("VmHWM") / 1024) < 1.0 and peak * 1024 > hwm


def test_manifest_records_stages_versions_and_checksums(release):
    tmp, _, _, _ = release
    out = tmp / "dist" / "tiny-ko"
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "ok"
    assert list(man["stages"]) == ["load", "calibrate", "reference", "prune", "trim_vocab", "save", "export", "validate"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in man["stages"].values())
    assert len(man["recipe_sha256"]) == 64 and man["recipe"]["name"] == "tiny-ko"
    assert {"torch", "transformers", "onnxruntime"} <= set(man["versions"])
    assert man["files"], "no files recorded"
    for rel, info in man["files"].items():
        assert sha256_file(out / rel) == info["sha256"], rel
        assert (out / rel).stat().st_size == info["bytes"]


def test_vocab_trimmed_and_token_map_consistent(release):
    tmp, _, _, _ = release
    out = tmp / "dist" / "tiny-ko"
    tm = json.loads((out / "model" / "token_map.json").read_text())["new_to_old"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["vocab_size"] == len(tm) < 262_144
    assert tm == sorted(tm) and len(set(tm)) == len(tm)
    assert cfg["bos_token_id"] == tm.index(2) and cfg["eos_token_id"] == tm.index(1)


def test_gates_and_report(release):
    tmp, _, result, _ = release
    out = tmp / "dist" / "tiny-ko"
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["failed_gates"] == []
    names = {c["name"]: c for c in rep["checks"]}
    assert names["tokenizer parity (held-out target text)"]["value"] == 1.0
    assert names["tokenizer round trip (all languages)"]["value"] == 1.0
    every = names["every code point of the kept scripts tokenizes as before"]
    assert every["passed"] and "Hangul 11,7" in every["detail"]  # gated: the trim kept all of Hangul
    assert names["ONNX float vs PyTorch max |Δlogit|"]["value"] < 1e-3
    for label in ("short", "long"):  # the float artifact in onnxruntime-genai, and the float graph in onnxruntime
        assert names[f"ONNX float greedy tokens with KV cache identical, {label} prompt"]["passed"]
        assert names[f"artifact (onnxruntime-genai) greedy tokens with KV cache identical, {label} prompt"]["passed"]
    for g in rep["onnx"]["greedy"].values():  # how close each of PyTorch's greedy choices was
        assert len(g["torch_top2_margins"]) == len(g["torch"]) and min(g["torch_top2_margins"]) >= 0
    # a float artifact leaves PyTorch's top-1 lead where it was, at every parity position (informational check)
    lm = rep["onnx"]["artifact_lead_moved"]
    assert lm["positions"] == rep["onnx"]["positions"]
    assert 0 <= lm["median"] <= lm["p90"] <= lm["p99"] <= lm["max"] < 1e-3
    moved = names["artifact's change of PyTorch's top-1 lead, 90th percentile (logits)"]
    assert moved["passed"] is None and "near-tie margin is 0" in moved["detail"]
    assert "how far the shipped artifact moves PyTorch's lead" in (out / "report.md").read_text()
    assert rep["onnx"]["long_prompt_tokens"] == 100 and rep["onnx"]["runtime"] == "onnxruntime-genai"
    assert rep["tokenizer"]["en"]["parity"]["gated"] is False
    assert rep["vocab"]["policies"]["ranked"] == 500  # English: the tokenizer's 500 best-ranked Latin tokens
    assert rep["prune"]["measured_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert set(rep["quality"]) == {"ko", "en", "uk"}
    md = (out / "report.md").read_text()
    for section in ("## Checks", "## Size", "## Quality on held-out text", "## Tokenizer", "## ONNX parity", "## Speed"):
        assert section in md
    plots = {"quality": "plots/quality.png", "tokens_per_char": "plots/tokens_per_char.png"}
    assert rep["plots"] == {**plots, "sparsity": "plots/sparsity.png"}  # wanda: per-layer sparsity, no FFN widths
    assert sorted(linked_images(md)) == sorted(rep["plots"].values())
    for rel in rep["plots"].values():
        assert_png(out / rel)
    assert "✓" in result.output and "release written to" in result.output


def test_release_generates_with_onnxruntime_genai(release):
    """The default export format: the README's generate loop with onnxruntime-genai's own tokenizer."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tmp, _, _, _ = release
    onnx_dir = tmp / "dist" / "tiny-ko" / "onnx"
    rep = json.loads((tmp / "dist" / "tiny-ko" / "report.json").read_text())
    assert rep["onnx"]["runtime"] == "onnxruntime-genai"
    model = og.Model(str(onnx_dir))
    tokenizer = og.Tokenizer(model)
    prompt = "대한민국 헌법"
    ids = tokenizer.encode(prompt)
    # the trimmed tokenizer (onnxruntime-genai's encode adds no BOS; the prompt gets it from the chat template)
    assert list(ids) == AutoTokenizer.from_pretrained(onnx_dir)(prompt, add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 5, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == len(ids) + 5
    assert isinstance(tokenizer.decode(gen.get_sequence(0)), str)


def test_optimum_format_release_loads_in_ortmodel(tiny_ckpt, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    recipe = tiny_recipe(tmp_path, tiny_ckpt, export={"format": "optimum", "quantize": "int8"})
    # a random tiny model's logits are nearly tied, so int8 weights flip some top-1 tokens
    args = [str(recipe), "--set", "validate.speed_prompts=0", "--set", "validate.onnx_min_top1_agreement=0.8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    onnx_dir = tmp_path / "dist" / "tiny-ko" / "onnx"
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    ids = tok("대한민국 헌법", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_same_recipe_gives_identical_files(release, tiny_ckpt, tmp_path):
    """A second run of the same recipe: every shipped model and ONNX file has the same sha256 in both manifests."""
    tmp, _, _, _ = release
    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    result = CliRunner().invoke(main, [str(recipe), "--set", "validate.speed_prompts=0"])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp / "dist" / "tiny-ko" / "manifest.json").read_text())["files"]
    second = json.loads((tmp_path / "dist" / "tiny-ko" / "manifest.json").read_text())["files"]
    shipped = sorted(k for k in first if k.startswith(("model/", "onnx/")))
    assert "model/model.safetensors" in shipped and "onnx/model.onnx" in shipped
    assert shipped == sorted(k for k in second if k.startswith(("model/", "onnx/")))
    differ = [k for k in shipped if first[k]["sha256"] != second[k]["sha256"]]
    assert not differ, differ


def test_failed_gate_exits_1_and_keeps_run_as_failed(tiny_ckpt, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    # onnxruntime's kernels never reproduce PyTorch's float logits to 1e-12.
    result = CliRunner().invoke(
        main, [str(recipe), "--set", "validate.onnx_max_abs_logit_diff=1e-12", "--set", "validate.speed_prompts=0"]
    )
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "dist" / "tiny-ko").exists()
    failed = tmp_path / "dist" / "tiny-ko.failed"
    rep = json.loads((failed / "report.json").read_text())
    assert rep["status"] == "gate_failed" and rep["failed_gates"] == ["ONNX float vs PyTorch max |Δlogit|"]
    assert "validation gates failed (ONNX float vs PyTorch max |Δlogit|)" in result.output


def test_runtime_failure_exits_3_and_keeps_manifest(tiny_ckpt, tmp_path, monkeypatch):
    import converter.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(pipeline, "export_onnx", boom)
    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    result = CliRunner().invoke(main, [str(recipe)])
    assert result.exit_code == 3, result.output
    assert "simulated exporter crash" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "dist" / "tiny-ko").exists()
    man = json.loads((tmp_path / "dist" / "tiny-ko.failed" / "manifest.json").read_text())
    assert man["status"] == "failed" and man["stages"]["export"]["status"] == "failed"
    assert man["stages"]["save"]["status"] == "ok"


def test_genai_refusal_is_found_before_any_weight_is_loaded(tmp_path):
    """A model onnxruntime-genai's builder cannot carry: `check` and `run` exit 2 with one sentence, and the
    run writes nothing; with export.format optimum the same recipe passes `check`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_model("llama", vocab_size=512, tie=False).config
    cfg.head_dim = 8
    ckpt = tmp_path / "hd8"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    recipe = tiny_recipe(tmp_path, ckpt, vocab={"enabled": False}, prune={"method": "none"})
    for cmd in (["check", str(recipe)], [str(recipe)]):
        result = CliRunner().invoke(main, cmd)
        assert result.exit_code == 2, result.output
        assert "head_dim 8 is not a multiple of 16" in result.output and "export.format: optimum" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
    result = CliRunner().invoke(main, ["check", str(recipe), "--set", "export.format=optimum"])
    assert result.exit_code == 0, result.output


def test_linear_bits_typo_fails_right_after_load(tiny_ckpt, tmp_path):
    """A export.linear_bits pattern that names no linear stops the run with exit 2 and one sentence right after
    the load stage, not after pruning; nothing named like a finished release appears."""
    import json

    bad = {"quantize": "int8", "linear_bits": {"model.layers.*.mlp.gate": 4}}  # gate_proj, not gate
    recipe = tiny_recipe(tmp_path, tiny_ckpt, export=bad)
    result = CliRunner().invoke(main, [str(recipe)])
    assert result.exit_code == 2, result.output
    assert "pattern 'model.layers.*.mlp.gate' matches no linear of the checkpoint" in result.output
    assert "Traceback" not in result.output
    dist = tmp_path / "dist"
    assert not (dist / "tiny-ko").exists()
    manifest = json.loads((dist / "tiny-ko.failed" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and list(manifest["stages"]) == ["load"]


def _kill_in(cmd: list[str], dist: Path, stage: str) -> Path:
    """Start a real `langconvert` process, SIGKILL it once the manifest shows ``stage`` started (or, for a
    stage shorter than one poll, just finished: the next one runs); return its work directory."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = dist / f".tiny-ko.tmp-{proc.pid}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            started = stage in json.loads((work / "manifest.json").read_text())["stages"]
        except (OSError, ValueError):  # not written yet, or caught mid-write
            started = False
        if started:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before stage {stage} started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert work.is_dir() and not (dist / "tiny-ko").exists(), stage
    return work


def test_killed_runs_leave_no_release_and_resume_reuses_what_they_finished(tiny_ckpt, tmp_path, release):
    """SIGKILL real `langconvert` processes in prune, export and validate: no `<name>/` appears and the work
    directory stays; `--resume` takes over the newest one, reuses every stage it finished (a resumed run killed
    again is itself resumable) and removes the others; the release equals an uninterrupted run's."""
    fresh = json.loads((release[0] / "dist" / "tiny-ko" / "manifest.json").read_text())
    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "converter.cli", "run", str(recipe), "--set", "validate.speed_prompts=0"]
    _kill_in(cmd, dist, "prune")
    _kill_in(cmd, dist, "export")
    work = _kill_in([*cmd, "--resume"], dist, "validate")
    stages = json.loads((work / "manifest.json").read_text())["stages"]
    assert [s for s in stages if stages[s]["status"] == "reused"] == [
        "load", "calibrate", "reference", "prune", "trim_vocab", "save"
    ], stages
    assert stages["export"]["status"] == "ok"
    assert len([p for p in dist.iterdir() if p.name.startswith(".tiny-ko.tmp-")]) == 1  # the others removed

    result = CliRunner().invoke(main, ["run", str(recipe), "--set", "validate.speed_prompts=0", "--resume"])
    assert result.exit_code == 0, result.output
    out = dist / "tiny-ko"
    man = json.loads((out / "manifest.json").read_text())
    assert {s: e["status"] for s, e in man["stages"].items()} == {
        **{s: "reused" for s in ("load", "calibrate", "reference", "prune", "trim_vocab", "save", "export")},
        "validate": "ok",
    }
    def untimed(metrics):
        return {k: v for k, v in metrics.items() if k != "seconds"}

    assert untimed(man["stages"]["prune"]["metrics"]) == untimed(fresh["stages"]["prune"]["metrics"])
    assert not [p for p in dist.iterdir() if p.name != "tiny-ko"]
    assert not (out / ".resume").exists() and not (out / ".scratch").exists()
    shipped = {k: v["sha256"] for k, v in man["files"].items() if k.startswith(("model/", "onnx/"))}
    assert shipped and shipped == {k: fresh["files"][k]["sha256"] for k in shipped}


def test_resume_after_a_failed_gate_runs_validation_only(tiny_ckpt, tmp_path):
    """A failed gate, then --resume with the gate relaxed: every stage up to export is reused (a gate threshold
    is in no stage's key). With nothing to resume, --resume runs every stage."""
    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    args = ["run", str(recipe), "--set", "validate.speed_prompts=0"]
    result = CliRunner().invoke(main, [*args, "--set", "validate.onnx_max_abs_logit_diff=1e-12", "--resume"])
    assert result.exit_code == 1, result.output
    failed = json.loads((tmp_path / "dist" / "tiny-ko.failed" / "manifest.json").read_text())
    assert all(e["status"] == "ok" for s, e in failed["stages"].items()), failed["stages"]
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    man = json.loads((tmp_path / "dist" / "tiny-ko" / "manifest.json").read_text())
    assert {s: e["status"] for s, e in man["stages"].items()} == {
        **{s: "reused" for s in ("load", "calibrate", "reference", "prune", "trim_vocab", "save", "export")},
        "validate": "ok",
    }


def test_stage_keys_follow_what_each_stage_reads(tiny_ckpt, tmp_path):
    """Changing vocab changes the keys of trim_vocab, save and export only; a gate threshold changes none; the
    reuse plan then reruns load (the weights are needed again) but keeps calibrate and reference."""
    from converter.pipeline import plan_reuse, stage_keys
    from converter.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, tiny_ckpt)
    base = stage_keys(load_recipe(recipe), "cpu")
    vocab = stage_keys(load_recipe(recipe, ["vocab.min_count=2"]), "cpu")
    gate = stage_keys(load_recipe(recipe, ["validate.onnx_max_abs_logit_diff=0.5"]), "cpu")
    speed = stage_keys(load_recipe(recipe, ["validate.speed_prompts=0"]), "cpu")
    assert gate == base
    assert {s for s in base if base[s] != vocab[s]} == {"trim_vocab", "save", "export"}
    assert {s for s in base if base[s] != speed[s]} == {"reference"}
    assert stage_keys(load_recipe(recipe), "cuda")["prune"] != base["prune"]
    same = {s for s in base if base[s] == vocab[s]}
    assert plan_reuse(same) == {"calibrate", "reference"}
    assert plan_reuse(set(base)) == set(base)
    assert plan_reuse(set(base) - {"reference"}) == set(base) - {"reference", "load"}


def test_gptq_stage_feeds_the_export(tiny_ckpt, tmp_path):
    """export.gptq: a gptq stage between prune and trim_vocab, whose codes every layer MatMul of the shipped
    artifact reads; the checkpoint in model/ stays float (validated against)."""
    recipe = tiny_recipe(
        tmp_path,
        tiny_ckpt,
        export={"quantize": "int4", "block_size": 32, "lm_head_bits": 8, "gptq": True},
        prune={"method": "none"},
    )
    result = CliRunner().invoke(main, [str(recipe), "--set", "validate.speed_prompts=0"])
    out = tmp_path / "dist" / ("tiny-ko" if result.exit_code == 0 else "tiny-ko.failed")
    assert result.exit_code in (0, 1), result.output  # a random tiny model may miss a quality gate at 4 bits
    man = json.loads((out / "manifest.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["plots"]) == ["quality", "tokens_per_char"]  # prune.method none: no per-layer plot
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["quality.png", "tokens_per_char.png"]
    assert sorted(linked_images((out / "report.md").read_text())) == sorted(rep["plots"].values())
    stages = list(man["stages"])
    assert stages.index("prune") < stages.index("gptq") < stages.index("trim_vocab")
    g = man["stages"]["gptq"]["metrics"]
    assert g["linears"] == 7 * 2 and all(r < 1.0 for r in g["error_vs_rtn"].values())
    q = man["stages"]["export"]["metrics"]["quantization"]
    assert q["matmuls_with_calibrated_codes"] == sum(q["matmuls_by_bits"].values()) - 1  # all but the lm_head
    from safetensors.torch import load_file

    weights = load_file(out / "model" / "model.safetensors")
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert len(w.unique()) > 64  # float, not 16 levels per block
    lm = rep["onnx"]["artifact_lead_moved"]  # 4-bit codes move PyTorch's top-1 lead; a float artifact does not
    assert lm["positions"] == rep["onnx"]["positions"] and lm["p90"] > 1e-3


@pytest.mark.parametrize("source", ["pagemap", "smaps"])
def test_clean_checkpoint_pages_are_unmapped_and_written_ones_kept(tmp_path, monkeypatch, source):
    """unmap_clean_checkpoint_pages gives back the checkpoint pages a forward pass made resident without changing
    any result, and leaves a mapping alone once code has written into it (dropping those pages would bring
    back the file's bytes); the same from /proc/self/pagemap and, where that cannot be read, from smaps."""
    import torch
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    from converter import load
    from converter.load import unmap_clean_checkpoint_pages

    if source == "smaps":
        monkeypatch.setattr(load, "_page_kinds", lambda start, end: None)
    else:  # pagemap is readable here, so smaps must not be needed
        monkeypatch.setattr(load, "_unmap_clean_by_smaps", lambda: pytest.fail("smaps read although pagemap works"))

    tiny_model("llama", vocab_size=8192, tie=False).save_pretrained(tmp_path / "ckpt")  # ~4.6 MB of weights
    unmap_clean_checkpoint_pages()  # whatever earlier tests left mapped
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    assert unmap_clean_checkpoint_pages() >= 1024  # the lm_head alone is 2 MB, read whole by the forward
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # faulted back in from the page cache, same bytes
        model.lm_head.weight.mul_(0.5)  # a write into the mapping: its page is now this process's own copy
        halved = model(ids).logits
    assert not torch.equal(halved, before)
    assert unmap_clean_checkpoint_pages() == 0  # the written mapping is left alone
    with torch.no_grad():
        assert torch.equal(model(ids).logits, halved)  # so the write survives


def test_transformers_does_not_drag_in_scikit_learn():
    """With scikit-learn installed (the test extra brings it through lm-eval), a process that imports langconvert
    and then transformers' tokenizer and model classes and a model's modelling code loads neither scikit-learn
    nor pandas nor scipy, while a direct import of scikit-learn still works."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed, so transformers cannot import it either")
    code = (
        "import sys, converter\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from transformers.models.gemma3 import modeling_gemma3\n"
        "heavy = sorted(m for m in ('sklearn', 'pandas', 'scipy') if m in sys.modules)\n"
        "import sklearn.metrics\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
