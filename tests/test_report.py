"""Report plots from hand-written report numbers: which plots a run gets, valid PNG bytes, links in report.md."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from converter.report import render_markdown
from converter.report_plots import write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND", path


def linked_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def report(prune: dict | None) -> dict:
    def q(orig: float, conv: float, art: float | str) -> dict:
        return {
            "original": {"bpb": orig, "ppl": 10.0},
            "converted": {"bpb": conv, "ppl": 11.0},
            "artifact": {"bpb": art, "ppl": 11.5},
            "bpb_increase": 0.1,
        }

    def t(target: bool, before: float, after: float) -> dict:
        return {
            "target": target,
            "round_trip": {"identical": 3, "docs": 3},
            "before": {"tokens_per_char": before},
            "after": {"tokens_per_char": after, "byte_fallback_share": 0.0},
        }

    return {
        "name": "r",
        "status": "ok",
        "stages": {},
        "checks": [],
        "failed_gates": [],
        # NaN as report.json writes it: that language is left out of the plot, not an error
        "quality": {"ko": q(1.1, 1.2, 1.25), "en": q(0.9, 1.0, 1.05), "uk": q(1.5, 2.5, "nan")},
        "tokenizer": {"ko": t(True, 0.8, 0.8), "en": t(True, 0.25, 0.27), "uk": t(False, 0.3, 1.4)},
        "prune": prune,
        "plots": {},
    }


WANDA = {
    "method": "wanda",
    "target_sparsity": 0.5,
    "pattern": "unstructured",
    "skipped_layers": [2],
    "per_layer": {"0": {"q_proj": 0.5, "up_proj": 0.5}, "1": {"q_proj": 0.49, "up_proj": 0.51}},
}
EXPERTS = {
    "method": "experts",
    "skipped_layers": [],
    "per_layer": {"0": {"ffn_width_removed": 0.25}, "1": {"ffn_width_removed": 0.25}},
    "ffn": {
        "selection": "activation",
        "experts": 8,
        "width_before": 64,
        "width_after": 48,
        "refit": True,
        "layers": {
            "0": {"kept": 48, "error_removed": 0.2, "error_refit": 0.1},
            "1": {"kept": 48, "error_removed": 0.3, "error_refit": 0.2},
        },
    },
}
DATA = {"recipe": {}, "host": {"cpus": 2}, "files": {}}


def test_plots_per_prune_method_are_valid_pngs_linked_from_the_report(tmp_path):
    for prune, expected in (
        (WANDA, {"quality", "tokens_per_char", "sparsity"}),
        (EXPERTS, {"quality", "tokens_per_char", "ffn_width"}),
        ({"method": "none", "per_layer": {}, "skipped_layers": []}, {"quality", "tokens_per_char"}),
        (None, {"quality", "tokens_per_char"}),  # the prune stage never finished
    ):
        root = tmp_path / str((prune or {}).get("method"))
        rep = report(prune)
        rep["plots"] = write_plots(rep, root)
        assert set(rep["plots"]) == expected
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == sorted(
            rep["plots"].values()
        )
        for rel in rep["plots"].values():
            assert_png(root / rel)
        assert sorted(linked_images(render_markdown(rep, DATA))) == sorted(rep["plots"].values())


def test_plots_are_byte_identical_on_a_rerun(tmp_path):
    first = write_plots(report(WANDA), tmp_path / "a")
    second = write_plots(report(WANDA), tmp_path / "b")
    assert first == second
    for rel in first.values():
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_missing_numbers_skip_a_plot_and_a_broken_one_costs_only_itself(tmp_path, monkeypatch, caplog):
    import converter.report_plots as rp

    rep = report(WANDA)
    rep["quality"] = None
    rep["tokenizer"] = {"ko": {"before": {"tokens_per_char": "nan"}, "after": {}}}

    def broken(rep, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        raise ValueError("simulated drawing failure")

    monkeypatch.setitem(rp.PLOTS, "sparsity", broken)
    with caplog.at_level(logging.DEBUG, logger="converter.report_plots"):
        assert write_plots(rep, tmp_path) == {}
    assert not list(tmp_path.rglob("*.png"))
    assert "report plot quality: no numbers" in caplog.text and "sparsity could not be drawn" in caplog.text
