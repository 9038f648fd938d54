"""Shared fixtures: offline mode, paths to the real test material in ../shared, tiny models built in code."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZERS = SHARED / "tokenizers"
CORPORA = SHARED / "corpora"
NTREX = CORPORA / "ntrex128"
# language tag -> NTREX-128 file suffix (1,997 parallel news sentences per language)
NTREX_FILES = {
    "en": "eng-US",
    "ko": "kor",
    "uk": "ukr",
    "ru": "rus",
    "ja": "jpn",
    "zh": "zho-CN",
    "de": "deu",
    "fr": "fra",
    "es": "spa",
    "ar": "arb",
    "hi": "hin",
    "pl": "pol",
}


def ntrex_lines(lang: str) -> list[str]:
    """The NTREX-128 sentences of one language, in corpus order."""
    return (NTREX / f"newstest2019-ref.{NTREX_FILES[lang]}.txt").read_text(encoding="utf-8").splitlines()


def tiny_model(
    model_type: str = "gemma3_text", vocab_size: int = 512, tie: bool = True, seed: int = 0, layers: int = 2
):
    """A randomly initialised causal LM of the given family, 2 layers unless ``layers`` says otherwise (hidden 64,
    odd intermediate size 37); with more than 2, Gemma 3's last layer is a full-attention one.

    head_dim 16 (= hidden / heads, which optimum assumes) because onnxruntime's CPU GroupQueryAttention (export.format genai) needs a multiple of 16; the
    Gemma 3 layers are both sliding-window layers (window 16), the pattern onnxruntime-genai's builder assumes
    for the first five layers of six."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=min(2, vocab_size - 1),
        eos_token_id=min(1, vocab_size - 1),
        pad_token_id=0,
    )
    if model_type == "gemma3_text":
        kinds = ["sliding_attention"] * layers if layers <= 2 else ["sliding_attention"] * (layers - 1) + ["full_attention"]
        kwargs.update(sliding_window=16, layer_types=kinds)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_checkpoint(directory: Path, tokenizer: str, model_type: str = "gemma3_text", vocab_size: int = 262_144,
                    tie: bool = True) -> Path:
    """``tiny_model`` saved to ``directory`` with a real tokenizer from ../shared/data/tokenizers/<tokenizer>."""
    import shutil

    require_shared()
    tiny_model(model_type, vocab_size=vocab_size, tie=tie).save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / tokenizer / f, directory / f)
    return directory


def require_shared() -> None:
    if not SHARED.is_dir():
        pytest.fail(f"test material missing: {SHARED} (CI checks out ../shared beside the project)")


@pytest.fixture(scope="session")
def shared() -> Path:
    require_shared()
    return SHARED
