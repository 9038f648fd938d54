"""`langconvert analyze`: the geometry and expert math on hand-worked numbers, and the commands end to end on a
tiny model with a real tokenizer and real NTREX text, locally and on an in-process Ray instance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import NTREX, NTREX_FILES, tiny_checkpoint, tiny_model
from test_report import assert_png

from converter.analyze import geometry as geo
from converter.analyze import tasks
from converter.analyze.experts import sharing, top_sets
from converter.cli import main


def _packed(bits: list[int]) -> np.ndarray:
    return np.packbits(np.array(bits, dtype=bool))


def test_hamming_counts_differing_bits_over_the_mask_length():
    a = _packed([1, 1, 0, 0, 1, 0, 1, 1, 1, 0])  # 10 bits, padded to 16
    b = _packed([1, 0, 0, 0, 1, 0, 1, 1, 0, 0])  # differs from a at bits 1 and 8
    c = _packed([0, 0, 1, 1, 0, 1, 0, 0, 0, 1])  # the complement of a
    d = geo.hamming_matrix([a, b, c], 10)
    assert d.tolist() == [[0, 0.2, 1.0], [0.2, 0, 0.8], [1.0, 0.8, 0]]
    with pytest.raises(ValueError):
        geo.hamming_matrix([a, np.zeros(3, dtype=np.uint8)], 10)


def test_classical_mds_recovers_planar_points():
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0], [0.0, 4.0], [1.0, 1.0]])
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    coords = geo.classical_mds(dist)
    rec = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.testing.assert_allclose(rec, dist, atol=1e-9)
    # centred, and each axis's largest coordinate positive (a fixed sign)
    np.testing.assert_allclose(coords.mean(0), 0, atol=1e-9)
    for k in range(2):
        assert coords[np.argmax(np.abs(coords[:, k])), k] > 0


def test_group_means_by_hand():
    codes = ["a", "b", "c", "d"]
    d = np.array([[0, 1, 4, 6], [1, 0, 5, 7], [4, 5, 0, 2], [6, 7, 2, 0]], dtype=float)
    m = geo.group_means(d, codes, {"x": ["a", "b"], "y": ["c", "d", "zz"], "z": ["d"]})
    assert m["x"]["x"] == 1 and m["y"]["y"] == 2
    assert m["x"]["y"] == (4 + 6 + 5 + 7) / 4 and m["z"]["z"] is None


def test_every_corpus_language_has_a_glottolog_family():
    want = {
        "en": "Indo-European › Germanic",
        "de": "Indo-European › Germanic",
        "ru": "Indo-European › Balto-Slavic",
        "uk": "Indo-European › Balto-Slavic",
        "pl": "Indo-European › Balto-Slavic",
        "es": "Indo-European › Italic",
        "fr": "Indo-European › Italic",
        "hi": "Indo-European › Indo-Iranian",
        "ar": "Afro-Asiatic › Semitic",
        "ja": "Japonic › Japanese",
        "ko": "Koreanic",
        "zh": "Sino-Tibetan",
    }
    assert set(want) == set(NTREX_FILES)
    assert {c: geo.family_label(c) for c in want} == want
    assert geo.family_label("qaa") == "unclassified"


def test_expert_top_sets_and_sharing_by_hand():
    # 2 layers x 4 experts, top 2
    f_a = np.array([[0.9, 0.8, 0.1, 0.0], [0.5, 0.5, 0.4, 0.1]])
    f_b = np.array([[0.9, 0.1, 0.8, 0.0], [0.1, 0.2, 0.9, 0.8]])
    assert top_sets(f_a, 2) == [{0, 1}, {0, 1}]  # ties go to the lower index
    s = sharing({"a": f_a, "b": f_b}, 2)
    assert s["shared"].tolist() == [1, 0]
    assert s["specific"]["a"].tolist() == [1, 2] and s["specific"]["b"].tolist() == [1, 2]
    np.testing.assert_allclose(s["overlap"], [[1, (1 / 3) / 2], [(1 / 3) / 2, 1]])


def test_default_workers_use_every_core_and_respect_memory(monkeypatch):
    monkeypatch.setattr(tasks, "cpu_count", lambda: 8)
    monkeypatch.setattr(tasks, "_available_bytes", lambda: 10 * 2**30)
    assert tasks.default_workers(12) == 8
    assert tasks.default_workers(3) == 3
    assert tasks.default_workers(12, task_bytes=3 * 2**30) == 2  # 0.8 x 10 GiB holds two 3 GiB tasks
    assert tasks.default_workers(12, task_bytes=64 * 2**30) == 1


# --- end to end on a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama-layout model over the real GPT-2 vocabulary, FFN width 37 (odd, so shapes show)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("analyze") / "tiny-llama", "gpt2", "llama", 50257, tie=False)


LANGS = ("en", "ko", "uk", "ru")


def _corpus_args(langs=LANGS) -> list[str]:
    out = []
    for c in langs:
        out += ["--corpus", f"{c}={NTREX / f'newstest2019-ref.{NTREX_FILES[c]}.txt'}"]
    return out


def _small(tmp: Path, name: str) -> list[str]:
    return ["--out", str(tmp / name), "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def test_geometry_end_to_end(tiny_llama, tmp_path):
    r = CliRunner().invoke(main, ["analyze", "geometry", "--model", str(tiny_llama), *_corpus_args(),
                                  *_small(tmp_path, "geo"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "geo"
    data = json.loads((out / "distances.json").read_text())
    assert data["languages"] == list(LANGS)
    d = np.array(data["hamming"])
    assert d.shape == (4, 4) and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert np.all(d[~np.eye(4, dtype=bool)] > 0)  # different text gives different masks
    assert np.array(data["mds"]).shape == (4, 2)
    # one matrix per decoder layer, and the whole-model matrix is their bit-weighted mean
    per = np.array(data["per_layer_hamming"])
    assert per.shape == (2, 4, 4)
    for f in ("geometry.png", "dendrogram.png", "hamming.png"):
        assert_png(out / f)
    assert not list(tmp_path.glob(".geo.tmp-*"))


def test_geometry_masks_are_wanda_masks_of_the_dense_walk(tiny_llama):
    """A task's packed masks equal Wanda keep-masks computed directly from one full forward of the dense model."""
    from converter.analyze import language_windows, prepare_model
    from converter.prune.masks import unstructured_mask
    from converter.prune.wanda import wanda_scores

    src = prepare_model(str(tiny_llama))
    win = language_windows(src.tokenizer, "ko", NTREX / "newstest2019-ref.kor.txt", 4, 32, 0)
    res = tasks.measure(tasks.Task("ko", src.model, win, ("masks",), sparsity=0.5, batch_size=2))
    model = tiny_model("llama", vocab_size=50257, tie=False)
    sq: dict[str, torch.Tensor] = {}
    lins = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}

    def hook(name):
        def f(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + x.square().sum(0)

        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(win), use_cache=False)
    for h in hs:
        h.remove()
    want = []
    for i in range(2):
        names = sorted(n for n in lins if n.startswith(f"{i}."))
        for n in names:
            keep = unstructured_mask(wanda_scores(lins[n].weight, sq[n]), 0.5)
            want.append(np.packbits(keep.numpy().ravel()))
    assert np.array_equal(res["masks"], np.concatenate(want))


def test_experts_end_to_end_agree_with_structured_pruning(tiny_llama, tmp_path):
    r = CliRunner().invoke(main, ["analyze", "experts", "--model", str(tiny_llama), *_corpus_args(LANGS[:3]),
                                  *_small(tmp_path, "exp"), "--experts", "37", "--workers", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exp"
    data = json.loads((out / "experts.json").read_text())
    assert data["layers"] == 2 and data["experts"] == 37 and data["top"] == 9
    for c in LANGS[:3]:
        f = np.array(data["frequency"][c])
        assert f.shape == (2, 37)
        # each token puts exactly `top` experts in its top set
        np.testing.assert_allclose(f.sum(1), 9, rtol=1e-4)
        assert_png(out / f"experts_{c}.png")
    assert_png(out / "shared.png")

    # prune's structured FFN pruning on the same windows sees the same layer-0 expert frequencies
    from converter.analyze import language_windows, prepare_model
    from converter.calibrate import CalibrationResult
    from converter.load import load_model
    from converter.prune.layerwise import prune
    from converter.recipe import ModelSpec, PruneConfig

    src = prepare_model(str(tiny_llama))
    win = language_windows(src.tokenizer, "ko", NTREX / "newstest2019-ref.kor.txt", 4, 32, 0)
    loaded = load_model(ModelSpec(source=str(tiny_llama)))
    calib = CalibrationResult(languages={}, windows=torch.from_numpy(win), window_langs=["ko"] * 4)
    res = prune(loaded, calib, PruneConfig(method="experts", sparsity=0.25, experts=37, batch_size=2))
    pruned_freq = res.ffn["layers"]["0"]["expert_frequency"]["ko"]
    np.testing.assert_allclose(data["frequency"]["ko"][0], pruned_freq, atol=1e-4)


def test_local_processes_use_every_worker(tiny_llama):
    from converter.analyze import language_windows, prepare_model

    src = prepare_model(str(tiny_llama))
    win = language_windows(src.tokenizer, "en", NTREX / "newstest2019-ref.eng-US.txt", 2, 16, 0)
    ts = [tasks.Task(f"t{k}", src.model, win, ("hidden",), batch_size=2) for k in range(4)]
    res = tasks.run_tasks(ts, workers=2)
    assert len({r["pid"] for r in res}) == 2 and os.getpid() not in {r["pid"] for r in res}
    assert all(t.threads == max(1, tasks.cpu_count() // 2) for t in ts)
    # the same windows give the same numbers in every process
    for r in res[1:]:
        assert np.array_equal(r["hidden_sq"], res[0]["hidden_sq"])


def test_ray_gives_the_local_distances(tiny_llama, tmp_path):
    import ray  # part of the test install (pyproject's test extra)

    from converter.analyze import RunOptions, prepare_model
    from converter.analyze.geometry import analyze_geometry

    corpora = {c: NTREX / f"newstest2019-ref.{NTREX_FILES[c]}.txt" for c in LANGS[:3]}
    src = prepare_model(str(tiny_llama))
    opts = RunOptions(samples=4, seq_len=32, batch_size=2, workers=1)
    local = analyze_geometry(src, corpora, tmp_path / "local", opts=opts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        opts.ray_address = "local"
        remote = analyze_geometry(src, corpora, tmp_path / "ray", opts=opts)
    finally:
        ray.shutdown()
    assert remote["hamming"] == local["hamming"]
    assert remote["mds"] == local["mds"]


def test_bad_analysis_input_is_one_sentence_and_exit_2(tiny_llama, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["analyze", "geometry", "--model", str(tiny_llama), "--corpus", "ko", "--out",
                             str(tmp_path / "x")])
    assert r.exit_code == 2 and "is not CODE=FILE" in r.output
    r = runner.invoke(main, ["analyze", "geometry", "--model", str(tiny_llama), "--corpus",
                             f"ko={tmp_path / 'missing.txt'}", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(main, ["analyze", "geometry", "--model", str(tiny_llama), *_corpus_args(LANGS[:2]),
                             "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "at least 3 languages" in r.output
    keep = tmp_path / "exists"
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me")
    r = runner.invoke(main, ["analyze", "experts", "--model", str(tiny_llama), *_corpus_args(LANGS[:2]),
                             "--out", str(keep)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert (keep / "mine.txt").read_text() == "keep me"
    r = runner.invoke(main, ["analyze", "experts", "--model", str(tiny_llama), *_corpus_args(LANGS[:2]),
                             *_small(tmp_path, "e"), "--experts", "5", "--workers", "1"])
    assert r.exit_code == 2 and "does not divide the FFN width 37" in r.output
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.tmp-*"))


def test_feature_overlap_math_by_hand():
    from converter.analyze.features import overlap, rms, top_dims

    v = rms(np.array([[4.0, 16.0, 1.0, 16.0]]), 4)  # RMS 1, 2, 0.5, 2
    assert v.tolist() == [[1.0, 2.0, 0.5, 2.0]]
    assert top_dims(v, 2) == [[1, 3]]  # ties: lower index first
    assert overlap([[1, 3], [0, 2]], [[3, 0], [1, 3]]) == [0.5, 0.0]


def test_features_end_to_end(tiny_llama, tmp_path):
    args = ["--parallel", f"en={NTREX / 'newstest2019-ref.eng-US.txt'}",
            "--parallel", f"ko={NTREX / 'newstest2019-ref.kor.txt'}"]
    r = CliRunner().invoke(main, ["analyze", "features", "--model", str(tiny_llama), *args, "--top", "8",
                                  "--out", str(tmp_path / "f"), "--samples", "2", "--seq-len", "64",
                                  "--workers", "1"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "f" / "features.json").read_text())
    assert data["directions"] == ["en-ko", "ko-en"]
    for d in data["directions"]:
        assert len(data["overlap"][d]) == 2 and all(0 <= v <= 1 for v in data["overlap"][d])
    assert set(data["top_dims"]) == {"text:en", "text:ko", "translation:en-ko", "translation:ko-en"}
    assert all(len(layer) == 8 for layer in data["top_dims"]["translation:en-ko"])
    assert_png(tmp_path / "f" / "features.png")
    r = CliRunner().invoke(main, ["analyze", "features", "--model", str(tiny_llama), *args, "--direction", "en-fr",
                                  "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "en-fr" in r.output and not (tmp_path / "g").exists()
