"""`langconvert analyze`: how the model itself groups languages, before a release picks which ones to keep.

- geometry: per-language Wanda keep-masks -> Hamming distances -> MDS and a tree (geometry.py);
- experts: per-language, per-layer activation frequency of the MoE-fied FFN experts that structured pruning
  removes (experts.py, with prune/moe.py's MoE-fication);
- features: large-magnitude hidden dimensions of translation prompts against monolingual text (features.py).

Each language (or prompt set) is one task (tasks.py): local processes by default, Ray tasks with ``ray``.
Output directories are written whole or not at all (a temporary sibling renamed at the end).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How every analysis cuts its windows and where its tasks run (the CLI's shared options)."""

    samples: int = 32  # windows per language
    seq_len: int = 256  # tokens per window
    seed: int = 0
    batch_size: int = 8
    ray_address: str | None = None
    workers: int | None = None
    overwrite: bool = False


@dataclass
class ModelSource:
    """What every task needs to load the model the same way, and the tokenizer the windows are cut with."""

    model: dict[str, Any]  # ModelSpec fields
    tokenizer: Any
    model_bytes: int
    num_layers: int
    model_type: str


def prepare_model(source: str, tokenizer: str | None = None, dtype: str = "float32") -> ModelSource:
    """Load the model once here (a GGUF is dequantized and cached now, not by every task), keep its tokenizer,
    and describe the local checkpoint the tasks load."""
    from converter.load import load_model
    from converter.recipe import ModelSpec

    loaded = load_model(ModelSpec(source=source, tokenizer=tokenizer, dtype=dtype), Path.cwd())
    src = str(loaded.checkpoint_dir) if loaded.checkpoint_dir is not None else source
    tok = str(loaded.tokenizer_dir) if loaded.tokenizer_dir is not None else None
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    out = ModelSource(
        model={"source": src, "tokenizer": tok, "dtype": dtype},
        tokenizer=loaded.tokenizer,
        model_bytes=model_bytes,
        num_layers=len(loaded.arch.decoder_layers()),
        model_type=loaded.arch.model_type,
    )
    loaded.release_weights()
    return out


def parse_pairs(items: tuple[str, ...] | list[str], option: str) -> dict[str, Path]:
    """CODE=FILE options -> {normalized code: path}; a malformed item or a missing file is a DataError."""
    from converter.recipe import LanguageSpec

    out: dict[str, Path] = {}
    for item in items:
        code, sep, path = item.partition("=")
        if not sep or not code or not path:
            raise DataError(f"{option} '{item}' is not CODE=FILE; write e.g. {option} ko=corpus/ko.txt.")
        try:
            norm = LanguageSpec(code=code.strip(), sources=[path]).code
        except Exception as exc:  # noqa: BLE001 — pydantic's message, as one sentence
            raise DataError(f"{option} '{item}': '{code}' is not a known language tag; use a BCP-47 tag such as ko.") from exc
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"{option} '{item}': '{p}' does not exist; fix the path.")
        if norm in out:
            raise DataError(f"{option} names '{norm}' twice; give each language once.")
        out[norm] = p
    return out


def language_windows(tokenizer: Any, code: str, path: Path, samples: int, seq_len: int, seed: int) -> np.ndarray:
    """Seeded calibration windows of one language's text, cut exactly as a recipe's calibration cuts them (its
    held-out tail unused)."""
    from converter.calibrate import calibrate
    from converter.recipe import CalibrationConfig, LanguageSpec

    calib = calibrate(
        tokenizer,
        [LanguageSpec(code=code, sources=[str(path)])],
        CalibrationConfig(num_samples=samples, seq_len=seq_len),
        seed,
        lambda patterns, _what: [Path(p) for p in patterns],
    )
    return calib.windows.numpy()


def language_tasks(source: ModelSource, corpora: dict[str, Path], opts: RunOptions, want: tuple[str, ...],
                   **task_fields: Any) -> list:
    """One task per language: its windows, the numbers wanted, the model every task loads."""
    from converter.analyze.tasks import Task

    return [
        Task(
            name=code,
            model=source.model,
            windows=language_windows(source.tokenizer, code, path, opts.samples, opts.seq_len, opts.seed),
            want=want,
            batch_size=opts.batch_size,
            meta={"task_bytes": int(2.5 * source.model_bytes)},
            **task_fields,
        )
        for code, path in corpora.items()
    ]


@contextmanager
def output_dir(out: Path, overwrite: bool):
    """A temporary sibling to write into, renamed to ``out`` when the body finishes; removed when it fails."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"--out '{out}' already exists; remove it, choose another directory, or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
