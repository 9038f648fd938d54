"""The tokenizer a GGUF file describes, written as tokenizer.json + tokenizer_config.json.

transformers 4.57 rebuilds a GGUF's vocabulary (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) but
ignores part of the metadata that llama.cpp, which runs the file, obeys. Measured on SmolLM2-135M-Instruct's
GGUF (byte-level BPE, ``tokenizer.ggml.pre = smollm``):

- ``eos_token`` is the BOS token: ``GGUFLlamaConverter.tokenizer`` reads the eos token from ``bos_token_id``
  (``<|im_start|>`` instead of ``<|im_end|>``), so generation would stop on the wrong token;
- ``tokenizer.ggml.add_bos_token: false`` is ignored: every encode starts with ``<|im_start|>``;
- ``tokenizer.ggml.padding_token_id`` is ignored (no pad token);
- the ``smollm`` pre-tokenizer (every number character its own pre-token, then GPT-2's regex; llama.cpp's
  LLAMA_VOCAB_PRE_TYPE_SMOLLM) becomes GPT-2's regex alone; with this vocabulary (no token holds a digit next
  to anything else) that changes only non-ASCII numerals (3 of 1,997 Korean NTREX lines, no English, French,
  German or Russian line);
- a byte-level vocabulary gets SentencePiece's decoder chain (byte fallback, '▁' -> ' ') in front of ByteLevel.

Vocabulary and merges are read correctly (the segmentation of every NTREX line above is unchanged by the
repairs). :func:`write_gguf_tokenizer` repairs these from the file's own metadata; GGUF files whose
vocabulary transformers gets wrong (Gemma 3's, rebuilt as Unigram) still need ``model.tokenizer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the repairs change, so cached conversions get a rebuilt tokenizer.
VERSION = 1
MARKER = ".gguf-tokenizer"

# tokenizer.ggml.pre values of byte-level ("gpt2") vocabularies whose pre-tokenizer is GPT-2's regex, optionally
# after splitting every number character off (llama.cpp's llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
_GPT2_REGEX_PRE = {"gpt-2": False, "smollm": True}


def _metadata(path: Path) -> dict[str, Any]:
    """The scalar tokenizer.ggml.* fields (token lists left out)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] not in (
            "tokens",
            "scores",
            "token_type",
            "merges",
        ):
            out[key.removeprefix("tokenizer.ggml.")] = f.contents()
        elif key == "tokenizer.chat_template":
            out["chat_template"] = f.contents()
    return out


def _repair(backend: Any, meta: dict[str, Any], notes: list[str]) -> Any:
    """The transformers-built ``tokenizers.Tokenizer`` with the metadata's pre-tokenizer, decoder and BOS rule."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors

    tj = json.loads(backend.to_str())
    byte_level = meta.get("model") == "gpt2"
    if byte_level and tj["model"].get("byte_fallback"):
        tj["model"]["byte_fallback"] = False  # every byte has a token of its own: nothing to fall back to
    tok = Tokenizer.from_str(json.dumps(tj))
    if byte_level:
        pre = meta.get("pre", "gpt-2")
        byte_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in _GPT2_REGEX_PRE:
            digits = _GPT2_REGEX_PRE[pre]
            tok.pre_tokenizer = (
                pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_pre])
                if digits
                else byte_pre
            )
            split = " (numbers split per character)" if digits else ""
            notes.append(f"pre-tokenizer '{pre}' rebuilt{split}")
        else:
            notes.append(
                f"GGUF pre-tokenizer '{pre}' is not one langconvert rebuilds; transformers' GPT-2 regex kept "
                "(check the tokenization against llama.cpp, or set model.tokenizer)"
            )
        tok.decoder = decoders.ByteLevel()
    if meta.get("add_bos_token") is False:
        tok.post_processor = processors.ByteLevel(trim_offsets=False) if byte_level else None
        notes.append("no BOS added (tokenizer.ggml.add_bos_token false)")
    return tok


def write_gguf_tokenizer(path: Path, out_dir: Path) -> list[str]:
    """Write the repaired tokenizer of the GGUF file ``path`` into ``out_dir`` (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, chat template); returns one note per repair."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    meta = _metadata(path)
    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    notes: list[str] = []
    backend = _repair(rebuilt.backend_tokenizer, meta, notes)
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}

    def token(key: str) -> str | None:
        i = meta.get(f"{key}_token_id")
        return by_id.get(int(i)) if i is not None else None

    specials = {"bos": token("bos"), "eos": token("eos"), "unk": token("unknown") or token("unk")}
    specials["pad"] = token("padding")
    for k, t in specials.items():
        was = getattr(rebuilt, f"{k}_token")
        if t is not None and t != was:
            notes.append(f"{k}_token {t} (transformers: {was})")
    extra = [
        a.content
        for a in backend.get_added_tokens_decoder().values()
        if a.special and a.content not in specials.values()
    ]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{k}_token": t for k, t in specials.items() if t is not None},
        additional_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        model_max_length=rebuilt.model_max_length,
    )
    if meta.get("chat_template"):
        fast.chat_template = meta["chat_template"]
    # save_pretrained of the GGUF-built tokenizer would copy the whole GGUF as tokenizer.model; this one has no
    # vocab file, so only the tokenizer files are written.
    fast.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps({"version": VERSION, "gguf": path.name, "notes": notes}))
    for n in notes:
        log.info("GGUF tokenizer: %s", n)
    return notes


def has_current_tokenizer(directory: Path) -> bool:
    marker = directory / MARKER
    if not (marker.is_file() and (directory / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("version") == VERSION
    except json.JSONDecodeError:
        return False
