"""calibrate(): text sources -> held-out split, token counts and seeded calibration windows per language."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LanguageData:
    code: str  # normalized BCP-47 tag
    scripts: list[str]  # Unicode script names for the language, e.g. ["Hangul", "Han"]
    calib_docs: list[str]  # documents calibration and vocabulary counts may use
    heldout_docs: list[str]  # documents only validation sees
    token_counts: Counter  # original-tokenizer id -> count over calib_docs
    calibrate: bool = True
    keep_vocab: bool = True

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts.values())


@dataclass
class CalibrationResult:
    languages: dict[str, LanguageData]
    windows: torch.Tensor  # (num_samples, seq_len) int64 token ids, original vocabulary
    window_langs: list[str] = field(default_factory=list)  # language code of each window

    def summary(self) -> dict[str, Any]:
        return {
            "num_windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]) if self.windows.ndim == 2 else 0,
            "languages": {
                code: {
                    "scripts": d.scripts,
                    "calib_docs": len(d.calib_docs),
                    "heldout_docs": len(d.heldout_docs),
                    "calib_tokens": d.num_tokens,
                    "distinct_tokens": len(d.token_counts),
                    "windows": self.window_langs.count(code),
                }
                for code, d in self.languages.items()
            },
        }
