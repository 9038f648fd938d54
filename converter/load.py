"""load_model(): a Hub id, a local checkpoint directory or a local GGUF file -> model + tokenizer.

GGUF files are dequantized by transformers once and cached as a safetensors checkpoint keyed by the file's
size, mtime and head hash, so the second run loads in seconds. safetensors only unless the recipe allows
pickle; remote code only when the recipe says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.arch import Arch


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on CPU, recipe dtype
    tokenizer: Any  # PreTrainedTokenizerFast backed by a tokenizer.json (the one stages edit)
    original_tokenizer: Any  # untouched copy, for parity checks
    arch: Arch
    source: str  # what the recipe named
    checkpoint_dir: Path | None  # local HF directory the weights came from (the cache for GGUF)
    tokenizer_dir: Path | None  # directory the tokenizer files came from
    original_vocab_size: int = 0
    original_num_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_type": self.arch.model_type,
            "num_parameters": self.original_num_parameters,
            "vocab_size": self.original_vocab_size,
            "tied_embeddings": self.arch.is_tied(),
            "num_layers": len(self.arch.decoder_layers()),
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "notes": self.notes,
        }
