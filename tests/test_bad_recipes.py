"""The bad-recipe corpus in tests/bad_recipes/: every file gets exit 2 and exactly its expected sentence, from
`check` and from a run, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import TOKENIZERS, require_shared

from converter.cli import main

CORPUS = Path(__file__).parent / "bad_recipes"
EXPECTED: dict[str, str] = yaml.safe_load((CORPUS / "expected.txt").read_text(encoding="utf-8"))
# Files that change a language's sources or the model and so need a run (not only `check`) to be exercised
RUN_TOO = ("python-tag.yaml", "language-unknown-key.yaml", "model-unknown-family.yaml", "source-empty-file.yaml")


def test_the_corpus_is_complete():
    files = sorted(p.name for p in CORPUS.glob("*.yaml") )
    assert files == sorted(EXPECTED) and len(files) >= 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The files the corpus' recipes point at: a valid Llama checkpoint config, an unsupported one, the Gemma 3
    tokenizer, an empty directory, a Korean text, an empty text and a fake .gguf."""
    require_shared()
    d = tmp_path_factory.mktemp("bad")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "ckpt-unknown").mkdir()
    (d / "ckpt-unknown" / "config.json").write_text(json.dumps({"model_type": "unknownarch"}))
    (d / "tok").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "gemma3" / f, d / "tok" / f)
    (d / "emptydir").mkdir()
    (d / "ko.txt").write_text("대한민국은 민주공화국이다.\n모든 권력은 국민으로부터 나온다.\n", encoding="utf-8")
    (d / "empty.txt").write_text("")
    (d / "fake.gguf").write_text("not gguf")
    for p in CORPUS.glob("*.yaml"):
        shutil.copy(p, d / p.name)
    return d


def _written(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name in ("out", "PWNED") or p.name.startswith("."))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_recipe_exits_2_with_its_sentence(name, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    commands = [["check", name]] + ([["run", name]] if name in RUN_TOO else [])
    for cmd in commands:
        result = CliRunner().invoke(main, cmd)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2, result.output
        assert lines == ["error: " + EXPECTED[name].format(dir=workdir)], result.output
        assert _written(workdir) == []
