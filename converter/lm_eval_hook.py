"""validate.lm_eval: lm-evaluation-harness tasks scored on the original and on the converted PyTorch model.

lm-eval runs in this process through its Python API: ``simple_evaluate`` on an ``HFLM`` that wraps the model and
tokenizer already in memory (the original in the reference stage, before pruning touches it; the converted model,
read back from model/, in validate), with a ``TaskManager`` that indexes the task YAML files written here and the
recipe's own. Tasks defined over local files run offline.

The built-in local task, ``next_sentence``, is multiple-choice next-sentence selection on held-out text: given
sentence i of a document, pick sentence i+1 among 4 candidates, the 3 others drawn with the recipe's seed from
*other* documents. It needs a document-aligned source (a text file with a ``DOCUMENT_IDS.tsv`` beside it holding
one document id per line, NTREX-128's layout) and uses only that file's held-out lines, split exactly as
``calibrate.split_heldout`` splits them (the tail; or every line of a ``heldout`` file), minus any line whose text
also occurs in the language's calibration documents: calibration never saw an item. The items are written as
JSON lines into the run's scratch directory with one task YAML per language (``dataset_path: json``, local
``data_files``), so lm-eval reads them like any user task; nothing is copied into the release.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import DataError, RecipeError
from converter.recipe import LmEvalConfig, Recipe

log = logging.getLogger(__name__)

NEXT_SENTENCE = "next_sentence"
TASK_PREFIX = "langconvert_next_sentence_"
CHOICES = 4
DOCUMENT_IDS = "DOCUMENT_IDS.tsv"
# Scripts written without spaces between sentences: their candidates follow the context directly.
_UNSPACED = {"Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan"}
INSTALL_HINT = "pip install -e '.[eval]' in the langconvert checkout (lm-eval==0.4.13)"
_METRIC_ORDER = ("acc_norm", "acc")


# ---------------------------------------------------------------------------------------------------- the task
def document_ids(path: Path) -> list[str] | None:
    """The document id of every line of ``path``, from a ``DOCUMENT_IDS.tsv`` beside it (first column, one row
    per line); None when there is none or its row count differs from the file's line count."""
    ids_file = path.parent / DOCUMENT_IDS
    if not ids_file.is_file() or path.suffix == ".jsonl":
        return None
    ids = [row.split("\t")[0].strip() for row in ids_file.read_text(encoding="utf-8").splitlines()]
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    return ids if len(ids) == n_lines else None


def heldout_line_indices(lines: list[str], heldout_fraction: float, whole: bool = False) -> list[int]:
    """Indices of the held-out lines of one source: the tail that ``calibrate.split_heldout`` holds out of its
    non-empty lines (``whole``: every non-empty line, for a language's ``heldout`` files)."""
    from converter.calibrate import split_heldout

    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    if whole:
        return nonempty
    return split_heldout(nonempty, heldout_fraction)[1]


def next_sentence_items(
    lines: list[str],
    doc_ids: list[str],
    heldout: list[int],
    seed: int | str,
    exclude: set[str] | frozenset[str] = frozenset(),
    choices: int = CHOICES,
) -> list[dict[str, Any]]:
    """Multiple-choice items over the ``heldout`` line indices of one document-aligned file.

    An item pairs held-out line i with line i+1 of the same document (the answer) and ``choices - 1`` held-out
    lines of other documents (distinct texts, drawn with ``random.Random(seed)``); the answer's position is drawn
    too and the items come back shuffled, so a ``limit`` takes a seeded sample. Lines whose text is in ``exclude``
    (the calibration documents) are never used."""
    text = {i: lines[i].strip() for i in heldout if lines[i].strip() and lines[i].strip() not in exclude}
    usable = sorted(text)
    pairs = [(i, i + 1) for i in usable if i + 1 in text and doc_ids[i] == doc_ids[i + 1]]
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for i, j in pairs:
        seen = {text[i], text[j]}
        pool: list[int] = []
        for k in usable:
            if doc_ids[k] != doc_ids[i] and text[k] not in seen:
                seen.add(text[k])
                pool.append(k)
        if len(pool) < choices - 1:
            continue
        others = rng.sample(pool, choices - 1)
        label = rng.randrange(choices)
        cand = others[:label] + [j] + others[label:]
        items.append(
            {
                "document": doc_ids[i],
                "line": i,
                "candidate_lines": cand,
                "context": text[i],
                "choices": [text[k] for k in cand],
                "label": label,
            }
        )
    rng.shuffle(items)
    return items


@dataclass
class LocalTask:
    """One generated task: a language's items in a JSON-lines file and the task YAML that reads it."""

    name: str
    language: str
    target: bool  # the language's vocabulary is kept (keep_vocab); a control language's task is not gated
    data: Path
    yaml: Path
    items: int
    sources: list[str]
    heldout_lines: int
    documents: int

    def summary(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "target": self.target,
            "items": self.items,
            "heldout_lines": self.heldout_lines,
            "documents": self.documents,
            "sources": self.sources,
        }


def _unspaced(code: str) -> bool:
    from converter.languages import language_scripts

    scripts = set(language_scripts(code))
    return "Hangul" not in scripts and bool(scripts & _UNSPACED)


def _task_yaml(name: str, data: Path, cache: Path, delimiter: str) -> str:
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    return json.dumps(cfg, ensure_ascii=False, indent=2) + "\n"  # JSON is YAML


def _parse_next_sentence(entry: str) -> list[str] | None:
    """'next_sentence' -> [] (every eligible language), 'next_sentence:ko,en' -> ['ko', 'en'], other -> None."""
    if entry == NEXT_SENTENCE:
        return []
    if entry.startswith(NEXT_SENTENCE + ":"):
        return [c.strip() for c in entry.split(":", 1)[1].split(",") if c.strip()]
    return None


def _aligned_sources(recipe: Recipe, lang: Any) -> tuple[list[tuple[Path, list[str]]], bool]:
    """The document-aligned files of a language (with their ids) and whether they are ``heldout`` files."""
    whole = bool(lang.heldout)
    patterns = lang.heldout if whole else lang.sources
    where = f"languages[{lang.code}].{'heldout' if whole else 'sources'}"
    out = []
    for f in recipe.resolve_sources(patterns, where):
        ids = document_ids(f)
        if ids is not None:
            out.append((f, ids))
    return out, whole


def next_sentence_languages(recipe: Recipe, entry: str) -> list[str]:
    """The languages a 'next_sentence[:codes]' entry builds tasks for; a DataError (one sentence, with the fix)
    when a named language is not in the recipe or none has a document-aligned source."""
    wanted = _parse_next_sentence(entry) or []
    codes = [lang.code for lang in recipe.languages]
    unknown = [c for c in wanted if c not in codes]
    if unknown:
        raise RecipeError(
            f"validate.lm_eval.tasks '{entry}' names {', '.join(unknown)}, not among the recipe's languages "
            f"({', '.join(codes)}); name recipe languages."
        )
    langs = [lang for lang in recipe.languages if not wanted or lang.code in wanted]
    eligible = [lang.code for lang in langs if _aligned_sources(recipe, lang)[0]]
    missing = [lang.code for lang in langs if lang.code not in eligible]
    if (wanted and missing) or not eligible:
        which = ", ".join(missing or codes)
        raise DataError(
            f"validate.lm_eval.tasks '{entry}' finds no document-aligned source for {which} (a text file with a "
            f"{DOCUMENT_IDS} beside it, one document id per line, as NTREX-128 ships); add such a source or name "
            "other languages, e.g. 'next_sentence:ko'."
        )
    return eligible


def build_next_sentence(
    recipe: Recipe,
    codes: list[str],
    out_dir: Path,
    calib_docs: dict[str, list[str]] | None = None,
) -> dict[str, LocalTask]:
    """Write the items and task YAML of the built-in task for each of ``codes`` into ``out_dir``; returns the
    tasks by lm-eval task name. ``calib_docs``: each language's calibration documents, whose texts are
    excluded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "hf_datasets"
    tasks: dict[str, LocalTask] = {}
    by_code = {lang.code: lang for lang in recipe.languages}
    for code in codes:
        lang = by_code[code]
        files, whole = _aligned_sources(recipe, lang)
        exclude = set(calib_docs.get(code, [])) if calib_docs else set()
        items: list[dict[str, Any]] = []
        n_held = 0
        docs: set[str] = set()
        for f, ids in files:
            lines = f.read_text(encoding="utf-8").splitlines()
            held = heldout_line_indices(lines, recipe.calibration.heldout_fraction, whole)
            n_held += len(held)
            prefixed = [f"{f.name}/{d}" for d in ids]  # two files may reuse a document id
            got = next_sentence_items(lines, prefixed, held, f"{NEXT_SENTENCE}/{code}/{f.name}/{recipe.seed}", exclude)
            docs.update(prefixed[i] for i in held)
            items.extend(got)
        if len(files) > 1:
            random.Random(f"{NEXT_SENTENCE}/{code}/{recipe.seed}").shuffle(items)
        if not items:
            raise DataError(
                f"validate.lm_eval: the held-out lines of languages[{code}] give no next-sentence item (no two "
                "consecutive held-out lines of one document); raise calibration.heldout_fraction or give longer "
                "sources."
            )
        name = TASK_PREFIX + code.replace("-", "_")
        data = out_dir / f"{name}.jsonl"
        with data.open("w", encoding="utf-8") as fh:
            for n, item in enumerate(items):
                fh.write(json.dumps({"id": n, **item}, ensure_ascii=False) + "\n")
        yaml_path = out_dir / f"{name}.yaml"
        yaml_path.write_text(_task_yaml(name, data, cache, "" if _unspaced(code) else " "), encoding="utf-8")
        tasks[name] = LocalTask(
            name=name,
            language=code,
            target=lang.keep_vocab,
            data=data,
            yaml=yaml_path,
            items=len(items),
            sources=[str(f) for f, _ in files],
            heldout_lines=n_held,
            documents=len(docs),
        )
        log.info("lm_eval: %s, %d items from %d held-out lines of %d documents", name, len(items), n_held, len(docs))
    return tasks


# ---------------------------------------------------------------------------------------------------- the suite
def _is_path(entry: str) -> bool:
    return "/" in entry or entry.endswith((".yaml", ".yml")) or entry.startswith((".", "~"))


@dataclass
class LmEvalSuite:
    """Everything one lm-eval run needs, the same for the original and the converted model."""

    cfg: LmEvalConfig
    specs: list[str]  # what TaskManager.load() gets: registered names and YAML paths
    include_paths: list[Path]
    include_defaults: bool  # lm-eval's own task index is needed (a registered task name was asked for)
    local: dict[str, LocalTask] = field(default_factory=dict)
    seed: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "specs": self.specs,
            "limit": self.cfg.limit,
            "num_fewshot": self.cfg.num_fewshot,
            "local_tasks": {name: t.summary() for name, t in self.local.items()},
        }


def _lm_eval_missing() -> bool:
    return importlib.util.find_spec("lm_eval") is None


def preflight_lm_eval(recipe: Recipe) -> None:
    """What needs no weights: lm-eval is installed, task paths exist, the built-in task has document-aligned
    sources, registered task names are known to lm-eval. Raises a one-sentence RecipeError or DataError."""
    cfg = recipe.validate_cfg.lm_eval
    if cfg is None:
        return
    if _lm_eval_missing():
        raise RecipeError(
            f"validate.lm_eval needs lm-evaluation-harness, which is not installed; run {INSTALL_HINT} or remove "
            "validate.lm_eval."
        )
    names = []
    for entry in cfg.tasks:
        if _parse_next_sentence(entry) is not None:
            next_sentence_languages(recipe, entry)
        elif _is_path(entry):
            path = recipe.resolve(entry)
            if not path.exists():
                raise DataError(
                    f"validate.lm_eval.tasks: '{entry}' ({path}) does not exist; give a task YAML file or a "
                    "directory of them."
                )
            if path.is_dir() and not any(path.rglob("*.yaml")):
                raise DataError(f"validate.lm_eval.tasks: the directory '{path}' holds no .yaml task; add one.")
        else:
            names.append(entry)
    if names:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_defaults=True).all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(
                f"validate.lm_eval.tasks: {', '.join(unknown)} is not a task lm-eval knows; check the spelling "
                "(python -m lm_eval ls tasks lists them) or give a path to a task YAML."
            )


def prepare_lm_eval(recipe: Recipe, calib: Any, work_dir: Path) -> LmEvalSuite | None:
    """Build the local tasks into ``work_dir`` and list what lm-eval will load; None without validate.lm_eval."""
    cfg = recipe.validate_cfg.lm_eval
    if cfg is None:
        return None
    calib_docs = {code: d.calib_docs for code, d in calib.languages.items()} if calib is not None else None
    specs: list[str] = []
    includes: list[Path] = []
    local: dict[str, LocalTask] = {}
    defaults = False
    codes: list[str] = []
    for entry in cfg.tasks:
        if _parse_next_sentence(entry) is not None:
            codes += [c for c in next_sentence_languages(recipe, entry) if c not in codes]
        elif _is_path(entry):
            path = recipe.resolve(entry)
            if path.is_dir():
                includes.append(path)
                specs.extend(_tasks_in_dir(path))
            else:
                specs.append(str(path))
        else:
            defaults = True
            specs.append(entry)
    if codes:
        local = build_next_sentence(recipe, codes, work_dir / "lm_eval_tasks", calib_docs)
        includes.insert(0, work_dir / "lm_eval_tasks")
        specs = list(local) + specs
    return LmEvalSuite(cfg, specs, includes, defaults, local, recipe.seed)


def _tasks_in_dir(path: Path) -> list[str]:
    """The leaf tasks defined by the YAML files under ``path`` (as lm-eval indexes them)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(path), include_defaults=False)
    found = [name for name in tm.all_subtasks]
    if not found:
        raise DataError(f"validate.lm_eval.tasks: the directory '{path}' defines no lm-eval task; add a task YAML.")
    return found


# ---------------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _rng_restored() -> Iterator[None]:
    """The global RNG states restored afterwards: simple_evaluate seeds random, numpy and torch globally, which
    must not leak into the stages that follow."""
    import numpy as np
    import torch

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _headline_metric(scores: dict[str, float], wanted: str | None) -> str | None:
    if wanted is not None:
        return wanted if wanted in scores else None
    for name in _METRIC_ORDER:
        if name in scores:
            return name
    return next(iter(scores), None)


def run_suite(model: Any, tokenizer: Any, suite: LmEvalSuite) -> dict[str, dict[str, Any]]:
    """Score ``model`` with ``tokenizer`` on every task of ``suite``: task -> {"scores": {metric: value},
    "stderr": {metric: value}, "items": n}."""
    if _lm_eval_missing():
        raise RecipeError(f"validate.lm_eval needs lm-evaluation-harness, which is not installed; run {INSTALL_HINT}.")
    if not suite.include_defaults:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json files only: never reach for the Hub
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval warns about every model passed as an object and every num_fewshot it sets: keep its errors only
    logging.getLogger("lm_eval").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    import datasets

    datasets.disable_progress_bars()  # the local files load in milliseconds
    cfg = suite.cfg
    with _rng_restored():
        tm = TaskManager(
            include_path=[str(p) for p in suite.include_paths] or None, include_defaults=suite.include_defaults
        )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(suite.specs),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            task_manager=tm,
            bootstrap_iters=1000,
            log_samples=False,
            random_seed=suite.seed,
            numpy_random_seed=suite.seed,
            torch_random_seed=suite.seed,
            fewshot_random_seed=suite.seed,
        )
        del lm
        gc.collect()
    results: dict[str, dict[str, Any]] = {}
    n_samples = out.get("n-samples", {})
    for task, res in out["results"].items():
        scores: dict[str, float] = {}
        stderr: dict[str, float] = {}
        for key, value in res.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _ = key.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[metric.removesuffix("_stderr")] = float(value)
            else:
                scores[metric] = float(value)
        if not scores:
            continue  # a group's row without scores of its own
        items = n_samples.get(task, {}).get("effective")
        results[task] = {"scores": scores, "stderr": stderr, "items": items}
    return results


def compare(
    original: dict[str, dict[str, Any]], converted: dict[str, dict[str, Any]], suite: LmEvalSuite
) -> tuple[dict[str, Any], list[Any]]:
    """Per task: the headline metric's original and converted score and their difference, and one check each
    (a gate when ``gate_max_drop`` is set, except on a control language's built-in task)."""
    from converter.validate import Check, gate

    cfg = suite.cfg
    tasks: dict[str, Any] = {}
    checks: list[Check] = []
    for name in sorted(set(original) | set(converted)):
        a = original.get(name, {}).get("scores", {})
        b = converted.get(name, {}).get("scores", {})
        metric = _headline_metric(a or b, cfg.metric)
        local = suite.local.get(name)
        row: dict[str, Any] = {
            "metric": metric,
            "original": a.get(metric) if metric else None,
            "converted": b.get(metric) if metric else None,
            "items": (converted.get(name) or original.get(name) or {}).get("items"),
            "language": local.language if local else None,
            "control": bool(local and not local.target),
            "original_scores": a,
            "converted_scores": b,
            "stderr_original": original.get(name, {}).get("stderr", {}).get(metric),
            "stderr_converted": converted.get(name, {}).get("stderr", {}).get(metric),
        }
        ok = row["original"] is not None and row["converted"] is not None
        row["delta"] = row["converted"] - row["original"] if ok else None
        tasks[name] = row
        label = f"lm-eval {name} {metric or '?'} drop (original − converted)"
        detail = (
            f"{row['original']:.3f} -> {row['converted']:.3f} over {row['items']} items"
            if ok
            else f"{cfg.metric or 'no metric'} missing from the task's results"
        )
        drop = row["original"] - row["converted"] if ok else float("nan")
        if cfg.gate_max_drop is not None and not row["control"]:
            checks.append(gate(label, drop, "<=", cfg.gate_max_drop, detail))
        else:
            why = "control language, not gated" if row["control"] and cfg.gate_max_drop is not None else "not gated"
            checks.append(Check(label, drop, detail=f"{detail} ({why})"))
    metrics = {"tasks": tasks, **suite.summary()}
    return metrics, checks
