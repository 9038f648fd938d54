"""validate.lm_eval: the built-in next-sentence task (unit tests on its builder) and lm-evaluation-harness run for
real on a tiny Gemma 3 model through `langconvert`, on NTREX-128 from ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import CORPORA, NTREX, TOKENIZERS, ntrex_lines, require_shared, tiny_checkpoint, tiny_model

from converter import lm_eval_hook
from converter.calibrate import calibrate, read_documents, split_heldout
from converter.cli import main
from converter.errors import DataError
from converter.lm_eval_hook import build_next_sentence, document_ids, next_sentence_items
from converter.recipe import recipe_from_dict

KO = NTREX / "newstest2019-ref.kor.txt"
EN = NTREX / "newstest2019-ref.eng-US.txt"


# ---------------------------------------------------------------------------------------------------- builder
def test_items_on_hand_made_documents():
    lines = ["a1", "a2", "a3", "b1", "b2", "c1", "c2", "d1"]
    docs = ["a", "a", "a", "b", "b", "c", "c", "d"]
    items = next_sentence_items(lines, docs, list(range(8)), seed=0)
    # every consecutive pair inside one document: a1-a2, a2-a3, b1-b2, c1-c2
    assert sorted((it["context"], it["choices"][it["label"]]) for it in items) == [
        ("a1", "a2"),
        ("a2", "a3"),
        ("b1", "b2"),
        ("c1", "c2"),
    ]
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        wrong = [k for n, k in enumerate(it["candidate_lines"]) if n != it["label"]]
        assert all(docs[k] != it["document"] for k in wrong)
    assert next_sentence_items(lines, docs, list(range(8)), seed=0) == items
    assert any(next_sentence_items(lines, docs, list(range(8)), seed=s) != items for s in range(1, 5))
    # a line outside the held-out indices or among the excluded (calibration) texts is never used
    held = [0, 1, 2, 3, 4, 5, 6]
    got = next_sentence_items(lines, docs, held, seed=0, exclude={"c1"})
    used = {text for it in got for text in [it["context"], *it["choices"]]}
    assert "d1" not in used and "c1" not in used
    assert {(it["context"], it["choices"][it["label"]]) for it in got} == {("a1", "a2"), ("a2", "a3"), ("b1", "b2")}


def ntrex_recipe(tmp: Path, seed: int = 0, **validate) -> object:
    require_shared()
    return recipe_from_dict(
        {
            "name": "t",
            "model": {"source": str(tmp)},
            "languages": [
                {"code": "ko", "sources": [str(KO)]},
                {"code": "uk", "calibrate": False, "keep_vocab": False, "sources": [str(NTREX / "newstest2019-ref.ukr.txt")]},
            ],
            "calibration": {"heldout_fraction": 0.1},
            "validate": {"lm_eval": {"tasks": ["next_sentence"], **validate}},
            "seed": seed,
        },
        tmp,
    )


def test_ntrex_task_uses_held_out_lines_of_other_documents_only(tmp_path):
    from transformers import AutoTokenizer

    recipe = ntrex_recipe(tmp_path)
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gemma3")
    calib = calibrate(tok, recipe.languages, recipe.calibration, recipe.seed, recipe.resolve_sources)
    calib_docs = {code: d.calib_docs for code, d in calib.languages.items()}
    tasks = build_next_sentence(recipe, ["ko", "uk"], tmp_path / "a", calib_docs)
    assert set(tasks) == {"langconvert_next_sentence_ko", "langconvert_next_sentence_uk"}
    assert tasks["langconvert_next_sentence_uk"].target is False

    lines = ntrex_lines("ko")
    ids = document_ids(KO)
    assert ids is not None and len(ids) == len(lines) == 1997
    _, held_docs = split_heldout(read_documents(KO), 0.1)
    first_held = len(lines) - len(held_docs)  # NTREX has no blank line: the held-out tail starts here
    items = [json.loads(x) for x in tasks["langconvert_next_sentence_ko"].data.read_text().splitlines()]
    assert len(items) == tasks["langconvert_next_sentence_ko"].items > 150
    calib_text = set(calib.languages["ko"].calib_docs)
    for it in items:
        assert it["line"] >= first_held and all(k >= first_held for k in it["candidate_lines"])
        assert it["choices"][it["label"]] == lines[it["line"] + 1].strip()
        assert ids[it["line"]] == ids[it["line"] + 1]
        wrong = [k for n, k in enumerate(it["candidate_lines"]) if n != it["label"]]
        assert len(wrong) == 3 and all(ids[k] != ids[it["line"]] for k in wrong)
        assert not ({it["context"], *it["choices"]} & calib_text)
    # the answer's position is spread over the four slots
    assert {it["label"] for it in items} == {0, 1, 2, 3}

    # deterministic by seed: same bytes again, other bytes with another seed
    again = build_next_sentence(recipe, ["ko"], tmp_path / "b", calib_docs)["langconvert_next_sentence_ko"]
    assert again.data.read_bytes() == tasks["langconvert_next_sentence_ko"].data.read_bytes()
    other = build_next_sentence(ntrex_recipe(tmp_path, seed=1), ["ko"], tmp_path / "c", calib_docs)
    assert other["langconvert_next_sentence_ko"].data.read_bytes() != again.data.read_bytes()

    task_yaml = yaml.safe_load(tasks["langconvert_next_sentence_ko"].yaml.read_text())
    assert task_yaml["dataset_path"] == "json" and task_yaml["output_type"] == "multiple_choice"
    assert task_yaml["dataset_kwargs"]["data_files"]["test"] == str(tasks["langconvert_next_sentence_ko"].data)


def test_next_sentence_needs_a_document_aligned_source(tmp_path):
    require_shared()
    recipe = recipe_from_dict(
        {
            "name": "t",
            "model": {"source": str(tmp_path)},
            "languages": [{"code": "ko", "sources": [str(CORPORA / "tatoeba" / "tatoeba.kor-eng.kor")]}],
            "validate": {"lm_eval": {"tasks": ["next_sentence"]}},
        },
        tmp_path,
    )
    with pytest.raises(DataError, match="DOCUMENT_IDS.tsv"):
        lm_eval_hook.next_sentence_languages(recipe, "next_sentence")


# ---------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gemma3", "gemma3")


def tiny_recipe(tmp: Path, ckpt: Path, lm_eval: dict) -> Path:
    recipe = {
        "name": "tiny-ko",
        "model": {"source": str(ckpt)},
        "languages": [
            {"code": "ko", "weight": 3, "sources": [str(KO)]},
            {"code": "en", "script_tokens": False, "top_tokens": 500, "sources": [str(EN)]},
        ],
        "calibration": {"num_samples": 8, "seq_len": 32, "max_heldout_docs": 4},
        "prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4},
        "vocab": {"min_count": 1},
        "export": {"enabled": False},
        "validate": {"speed_prompts": 0, "eval_seq_len": 32, "lm_eval": lm_eval},
        "output": {"dir": str(tmp / "dist")},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def test_check_without_lm_eval_is_one_sentence_exit_2(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_eval_hook, "_lm_eval_missing", lambda: True)
    recipe = tiny_recipe(tmp_path, tiny_ckpt, {"tasks": ["next_sentence"]})
    result = CliRunner().invoke(main, ["check", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not installed" in lines[0] and "pip install -e '.[eval]'" in lines[0]


def test_check_finds_bad_task_entries(tiny_ckpt, tmp_path):
    import lm_eval  # noqa: F401 — part of the test install (pyproject's test extra): a missing one fails
    for entry, words in (
        ("next_sentence:ja", "not among the recipe's languages"),
        ("tasks/missing.yaml", "does not exist"),
    ):
        recipe = tiny_recipe(tmp_path, tiny_ckpt, {"tasks": [entry]})
        result = CliRunner().invoke(main, ["check", str(recipe)])
        assert result.exit_code == 2 and words in result.output, result.output
    recipe = tiny_recipe(tmp_path, tiny_ckpt, {"tasks": ["next_sentence:ko"]})
    assert CliRunner().invoke(main, ["check", str(recipe)]).exit_code == 0


def test_lm_eval_on_original_and_converted_and_its_gate(tiny_ckpt, tmp_path):
    import lm_eval  # noqa: F401 — part of the test install (pyproject's test extra): a missing one fails
    lm = {"tasks": ["next_sentence:ko"], "limit": 8, "batch_size": 8}
    result = CliRunner().invoke(main, [str(tiny_recipe(tmp_path, tiny_ckpt, lm))])
    assert result.exit_code == 0, result.output
    out = tmp_path / "dist" / "tiny-ko"
    rep = json.loads((out / "report.json").read_text())
    task = rep["lm_eval"]["tasks"]["langconvert_next_sentence_ko"]
    assert task["metric"] == "acc_norm" and task["items"] == 8 and task["language"] == "ko"
    for side in ("original", "converted"):
        assert 0.0 <= task[side] <= 1.0
        assert set(task[f"{side}_scores"]) == {"acc", "acc_norm"}
    assert task["delta"] == pytest.approx(task["converted"] - task["original"])
    check = next(c for c in rep["checks"] if c["name"].startswith("lm-eval langconvert_next_sentence_ko"))
    assert check["passed"] is None and "(not gated)" in check["detail"]
    md = (out / "report.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness, PyTorch)" in md
    assert "| langconvert_next_sentence_ko (ko) | acc_norm | 8 |" in md
    # the task files stay in the scratch directory: nothing of the corpus ships
    assert not list(out.rglob("*.jsonl"))

    # the converted model cannot gain 100 points over the original
    recipe = tiny_recipe(tmp_path, tiny_ckpt, {**lm, "gate_max_drop": -1.0})
    result = CliRunner().invoke(main, [str(recipe), "--set", "output.overwrite=true"])
    assert result.exit_code == 1, result.output
    rep = json.loads((tmp_path / "dist" / "tiny-ko.failed" / "report.json").read_text())
    assert rep["failed_gates"] == ["lm-eval langconvert_next_sentence_ko acc_norm drop (original − converted)"]


def test_a_task_yaml_over_local_files_runs_offline(tmp_path):
    """A user's own task (lm-eval's YAML format, local JSON lines) given by path, scored in process."""
    import lm_eval  # noqa: F401 — part of the test install (pyproject's test extra): a missing one fails
    from transformers import AutoTokenizer

    from converter.lm_eval_hook import compare, prepare_lm_eval, run_suite

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in [(1, 2), (3, 4), (5, 6)]]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "sums.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "tiny_sums",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tasks / "sums.jsonl")}},
                "output_type": "multiple_choice",
                "test_split": "test",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "choices",
                "doc_to_target": "label",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    recipe = recipe_from_dict(
        {
            "name": "t",
            "model": {"source": str(tmp_path)},
            "languages": [{"code": "en", "sources": [str(EN)]}],
            "validate": {"lm_eval": {"tasks": ["tasks/sums.yaml"], "gate_max_drop": 0.0}},
        },
        tmp_path,
    )
    suite = prepare_lm_eval(recipe, None, tmp_path / "work")
    assert suite.local == {} and suite.specs == [str(tasks / "sums.yaml")] and not suite.include_defaults
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    model = tiny_model("llama", vocab_size=len(tok))
    got = run_suite(model, tok, suite)
    assert set(got) == {"tiny_sums"} and got["tiny_sums"]["items"] == 3
    metrics, checks = compare(got, got, suite)
    assert metrics["tasks"]["tiny_sums"]["metric"] == "acc" and metrics["tasks"]["tiny_sums"]["delta"] == 0.0
    assert [c.passed for c in checks] == [True]
