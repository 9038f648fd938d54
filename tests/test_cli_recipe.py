"""Recipe schema, `langconvert check`/`schema`, and the one-sentence exit-2 errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import CORPORA, ROOT, TOKENIZERS, require_shared

from converter.calibrate import _allocate, calibrate, split_heldout
from converter.cli import main
from converter.errors import DataError, RecipeError
from converter.recipe import field_reference, load_recipe


def write(tmp: Path, recipe: dict, name: str = "r.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return p


def base_recipe(tmp: Path) -> dict:
    require_shared()
    (tmp / "ko.txt").write_text("대한민국은 민주공화국이다.\n모든 권력은 국민으로부터 나온다.\n국민은 법 앞에 평등하다.\n")
    ckpt = tmp / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {
        "name": "t",
        "model": {"source": str(ckpt), "tokenizer": str(TOKENIZERS / "gemma3")},
        "languages": [{"code": "ko", "sources": ["ko.txt"]}],
        "output": {"dir": "out"},
    }


def check(tmp: Path, recipe: dict, *extra: str):
    return CliRunner().invoke(main, ["check", str(write(tmp, recipe)), *extra])


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_pass_check(path, tmp_path):
    require_shared()
    result = CliRunner().invoke(main, ["check", str(path), "--set", f"output.dir={tmp_path}"])
    assert result.exit_code == 0, result.output


def test_check_ok(tmp_path):
    result = check(tmp_path, base_recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    # every family langconvert carries, with the export formats that carry it
    from converter.arch import FAMILIES

    for model_type in FAMILIES:
        assert model_type in result.output
    assert "gpt2 (optimum)" in result.output and "bloom (optimum)" in result.output
    assert "llama" in result.output and "genai, optimum" in result.output


def test_unknown_key(tmp_path):
    r = base_recipe(tmp_path)
    r["prune"] = {"sparsty": 0.5}
    result = check(tmp_path, r)
    assert result.exit_code == 2
    assert "unknown key 'prune.sparsty'" in one_error_line(result)


def test_nm_pattern_needs_matching_sparsity(tmp_path):
    r = base_recipe(tmp_path)
    r["prune"] = {"pattern": "2:4", "sparsity": 0.6}
    result = check(tmp_path, r)
    assert result.exit_code == 2
    assert "prune.pattern '2:4' needs prune.sparsity 0.5, got 0.6" in one_error_line(result)


def test_unquoted_nm_pattern_in_yaml_is_a_string(tmp_path):
    base = base_recipe(tmp_path)
    text = yaml.safe_dump(base) + "prune:\n  pattern: 2:4\n  sparsity: 0.5\n"
    p = tmp_path / "nm.yaml"
    p.write_text(text)
    assert load_recipe(p).prune.nm == (2, 4)


def test_set_overrides_are_validated(tmp_path):
    r = base_recipe(tmp_path)
    ok = check(tmp_path, r, "--set", "prune.sparsity=0.7", "--set", "languages.0.weight=2")
    assert ok.exit_code == 0, ok.output
    bad = check(tmp_path, r, "--set", "prune.sparsity=1.5")
    assert bad.exit_code == 2 and "'prune.sparsity'" in one_error_line(bad)
    malformed = check(tmp_path, r, "--set", "prune.sparsity")
    assert malformed.exit_code == 2 and "KEY=VALUE" in one_error_line(malformed)
    index = check(tmp_path, r, "--set", "languages.5.weight=2")
    assert index.exit_code == 2 and "not an index" in one_error_line(index)


def test_bad_language_tag(tmp_path):
    r = base_recipe(tmp_path)
    r["languages"][0]["code"] = "klingonese!"
    result = check(tmp_path, r)
    assert result.exit_code == 2 and "languages.0.code" in one_error_line(result)


def test_missing_source_file(tmp_path):
    r = base_recipe(tmp_path)
    r["languages"][0]["sources"] = ["nope.txt"]
    result = check(tmp_path, r)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "nope.txt" in line and "does not exist" in line


def test_glob_matching_nothing(tmp_path):
    r = base_recipe(tmp_path)
    r["languages"][0]["sources"] = ["corpus/*.txt"]
    result = check(tmp_path, r)
    assert result.exit_code == 2 and "matches no file" in one_error_line(result)


def test_empty_corpus(tmp_path):
    r = base_recipe(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    r["languages"][0]["sources"] = ["empty.txt"]
    result = check(tmp_path, r)
    assert result.exit_code == 2 and "contain no text" in one_error_line(result)


def test_unsupported_model_family(tmp_path):
    r = base_recipe(tmp_path)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = check(tmp_path, r)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "model_type 't5' is not supported" in line and "llama" in line


def test_missing_model_path(tmp_path):
    r = base_recipe(tmp_path)
    r["model"]["source"] = str(tmp_path / "no-such-model")
    result = check(tmp_path, r)
    assert result.exit_code == 2 and "does not exist" in one_error_line(result)


def test_existing_release_is_not_replaced(tmp_path):
    r = base_recipe(tmp_path)
    (tmp_path / "out" / "t").mkdir(parents=True)
    result = check(tmp_path, r)
    assert result.exit_code == 2 and "output.overwrite" in one_error_line(result)
    assert check(tmp_path, r, "--set", "output.overwrite=true").exit_code == 0


def test_missing_and_invalid_recipe_files(tmp_path):
    missing = CliRunner().invoke(main, ["check", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "does not exist" in one_error_line(missing)
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    bad = CliRunner().invoke(main, ["check", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "not valid YAML" in one_error_line(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    lst = CliRunner().invoke(main, ["check", str(tmp_path / "list.yaml")])
    assert lst.exit_code == 2 and "mapping" in one_error_line(lst)


def test_run_with_bad_recipe_exits_2_before_loading(tmp_path):
    r = base_recipe(tmp_path)
    r["vocab"] = {"min_count": 0}
    result = CliRunner().invoke(main, [str(write(tmp_path, r))])
    assert result.exit_code == 2 and "'vocab.min_count'" in one_error_line(result)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_schema_and_readme_reference_agree():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "prune" in schema["properties"] and schema["additionalProperties"] is False
    readme = (ROOT / "README.md").read_text()
    for key, _, desc in field_reference():
        assert f"`{key}`" in readme, f"README recipe reference lacks {key}"
        assert desc, f"{key} has no description"


# ------------------------------------------------------------------------------------------------ calibration
def test_split_and_allocation():
    docs = [f"d{i}" for i in range(10)]
    calib, held = split_heldout(docs, 0.2)
    assert calib == docs[:8] and held == docs[8:]
    assert _allocate(10, [3, 1]) == [8, 2] and sum(_allocate(7, [1, 1, 1])) == 7


def test_calibrate_real_text_seeded(tmp_path):
    require_shared()
    from transformers import AutoTokenizer

    from converter.recipe import CalibrationConfig, LanguageSpec, Recipe

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    rec = Recipe.model_validate(
        {
            "name": "c",
            "model": {"source": "x"},
            "languages": [
                {"code": "ko", "weight": 3, "sources": [str(CORPORA / "tatoeba" / "tatoeba.kor-eng.kor")]},
                {"code": "en", "sources": [str(CORPORA / "tatoeba" / "tatoeba.kor-eng.eng")]},
            ],
        }
    )
    cfg = CalibrationConfig(num_samples=8, seq_len=16, heldout_fraction=0.1)
    langs = [LanguageSpec(**lang.model_dump()) for lang in rec.languages]
    a = calibrate(tok, langs, cfg, 0, rec.resolve_sources)
    b = calibrate(tok, langs, cfg, 0, rec.resolve_sources)
    c = calibrate(tok, langs, cfg, 1, rec.resolve_sources)
    assert a.windows.shape == (8, 16) and a.window_langs.count("ko") == 6
    assert a.windows.equal(b.windows) and not a.windows.equal(c.windows)
    ko = a.languages["ko"]
    assert len(ko.heldout_docs) == 64 and not set(ko.heldout_docs) & set(ko.calib_docs)
    assert ko.scripts[0] == "Hangul" and ko.num_tokens > 0
    # a control language (keep_vocab: false) is held out on max_control_heldout_docs, the targets as before
    langs[1] = langs[1].model_copy(update={"keep_vocab": False})
    cfg = cfg.model_copy(update={"max_control_heldout_docs": 5})
    d = calibrate(tok, langs, cfg, 0, rec.resolve_sources)
    assert len(d.languages["en"].heldout_docs) == 5 and d.languages["ko"].heldout_docs == ko.heldout_docs
    assert d.languages["en"].heldout_docs == a.languages["en"].heldout_docs[:5] and d.windows.equal(a.windows)


def test_calibrate_warns_on_wrong_script(tmp_path, caplog):
    require_shared()
    from transformers import AutoTokenizer

    from converter.recipe import CalibrationConfig, LanguageSpec

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    lang = LanguageSpec(code="ko", sources=[str(CORPORA / "tatoeba" / "tatoeba.kor-eng.eng")])
    with caplog.at_level("WARNING"):
        calibrate(tok, [lang], CalibrationConfig(num_samples=2, seq_len=8), 0, lambda pats, what: [Path(p) for p in pats])
    assert any("Hangul" in r.message for r in caplog.records)


def test_calibrate_empty_source_is_data_error(tmp_path):
    from transformers import AutoTokenizer

    from converter.recipe import CalibrationConfig, LanguageSpec

    require_shared()
    (tmp_path / "e.jsonl").write_text('{"text": "  "}\n')
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    lang = LanguageSpec(code="en", sources=[str(tmp_path / "e.jsonl")])
    with pytest.raises(DataError, match="contain no text"):
        calibrate(tok, [lang], CalibrationConfig(), 0, lambda pats, what: [Path(p) for p in pats])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    lang = LanguageSpec(code="en", sources=[str(tmp_path / "bad.jsonl")])
    with pytest.raises(DataError, match="line 1 is not JSON"):
        calibrate(tok, [lang], CalibrationConfig(), 0, lambda pats, what: [Path(p) for p in pats])


def test_recipe_error_is_recipe_error(tmp_path):
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, {"name": "x"}))


# ------------------------------------------------------------------------------------------------ vocab command
def test_vocab_command_trims_a_tokenizer_directory(tmp_path):
    require_shared()
    out = tmp_path / "ko-tok"
    args = ["vocab", str(TOKENIZERS / "qwen2.5"), "--languages", "ko", "--out", str(out),
            "--control-corpus", str(CORPORA / "udhr" / "ukr.txt"),
            "--corpus", str(CORPORA / "tatoeba" / "tatoeba.kor-eng.kor")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["vocab_before"] == 151_665 and stats["vocab_after"] < 20_000
    assert stats["heldout"]["round_trip"]["share"] == 1.0
    assert stats["selection"]["policies"]["chat_template"] > 0
    sc = stats["script_check"]  # every Hangul code point, alone / after a space / between neighbours
    assert sc["passed"] and sc["strings"] == 3 * sc["scripts"]["Hangul"]["code_points"] > 3 * 11_172
    assert "11,172" not in result.output and "strings as before" in result.output
    assert stats["chat_template"]["share"] == 1.0 and stats["chat_template"]["renders"] >= 2
    ctrl = stats["control"]["ukr.txt"]
    # Ukrainian is not kept: it still round-trips, through smaller pieces (more tokens per character).
    assert ctrl["round_trip"]["share"] == 1.0
    assert ctrl["after"]["tokens_per_char"] > 1.5 * ctrl["before"]["tokens_per_char"]
    tm = json.loads((out / "token_map.json").read_text())["new_to_old"]
    assert len(tm) == stats["vocab_after"] and (out / "chat_template.jinja").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in one_error_line(again)
    missing = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2


def test_vocab_command_on_a_sentencepiece_model_alone(tmp_path):
    require_shared()
    out = tmp_path / "uk-spm"
    args = ["vocab", str(TOKENIZERS / "mistral-sentencepiece"), "--languages", "uk", "--out", str(out),
            "--corpus", str(CORPORA / "ntrex128" / "newstest2019-ref.ukr.txt"),
            "--control-corpus", str(CORPORA / "udhr" / "kor.txt")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["vocab_before"] == 32_000 and stats["vocab_after"] < 8_000
    assert stats["heldout"]["round_trip"]["share"] == 1.0 and stats["heldout"]["parity"]["share"] > 0.9
    assert stats["control"]["kor.txt"]["round_trip"]["share"] == 1.0
    assert stats["chat_template"] is None
    assert stats["script_check"]["passed"] and set(stats["script_check"]["scripts"]) == {"Cyrillic"}
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "token_map.json", "tokenizer.model"]


@pytest.mark.parametrize(
    "extra,needle",
    [(["--coverage", "1.5"], "--coverage"), (["--max-size", "0"], "--max-size"), (["--max-size", "3"], "max_size 3")],
)
def test_vocab_command_rejects_bad_policy_values(tmp_path, extra, needle):
    require_shared()
    args = ["vocab", str(TOKENIZERS / "gpt2"), "--languages", "en", "--out", str(tmp_path / "o"),
            "--corpus", str(CORPORA / "tatoeba" / "tatoeba.kor-eng.eng"), *extra]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and needle in one_error_line(result)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_vocab_command_on_a_corrupt_sentencepiece_model(tmp_path):
    require_shared()
    src = tmp_path / "broken"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    args = ["vocab", str(src), "--languages", "uk", "--out", str(tmp_path / "o"),
            "--corpus", str(CORPORA / "udhr" / "ukr.txt")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "tokenizer.model" in one_error_line(result)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


# Generated here rather than kept in tests/bad_recipes/ (a 2 MiB file does not belong in the repository)
BAD_FILES = {
    "huge": ("# " + "x" * (2 << 20) + "\n", "not a recipe (they are a few KB of YAML)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_recipe_files_exit_2_with_one_sentence(case, tmp_path, monkeypatch):
    content, needle = BAD_FILES[case]
    p = tmp_path / f"{case}.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["check", str(p)])
    assert result.exit_code == 2 and needle in one_error_line(result)
    assert not (tmp_path / "PWNED").exists()


def test_a_key_repeated_with_the_same_value_is_accepted(tmp_path):
    r = base_recipe(tmp_path)
    text = yaml.safe_dump(r, allow_unicode=True) + f"name: {r['name']}\n"
    p = tmp_path / "same.yaml"
    p.write_text(text)
    assert load_recipe(p).name == r["name"]
