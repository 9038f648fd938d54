"""``export.format: genai``: the fused decoder of onnxruntime-genai's model builder, from the saved checkpoint.

The builder (``onnxruntime_genai.models.builder.create_model``) reads the directory the ``save`` stage wrote, so
pruning and trimming reach it as they are, and writes ``model.onnx`` + ``model.onnx.data`` with
GroupQueryAttention over a KV buffer shared between past and present, fused (Skip)SimplifiedLayerNormalization
and rotary embeddings, plus ``genai_config.json`` and the tokenizer. It is run in float32 with the embedding tied
to the lm_head when the checkpoint ties them; weight-only quantization (quantize.py) follows as a separate pass,
which is the same order the builder itself uses for int4 (it quantizes its finished float graph), so one float
graph serves both the parity checks and the quantized artifact.

Version: onnxruntime-genai 0.13.2. Its builder runs on transformers 4.57, which langconvert pins; 0.18 imports
transformers 5 classes at import time and on transformers 5 reads Gemma 3's ``rope_parameters`` in a layout that
transformers 5 nests per layer type.

Two edits follow the build:
- the rotary cos/sin caches are cut to ``export.context_length`` positions (the builder sizes them for the
  model's full ``max_position_embeddings``: 4 × 32,768 × 128 floats, 67 MB, for Gemma 3 270M);
- ``genai_config.json``'s ``search.max_length``, the KV capacity onnxruntime-genai allocates, becomes the same
  ``context_length``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from converter.errors import ExportError, ModelError, RecipeError
from converter.export.io import ONNX_NAME, array, load_lazy, reading_from, save, short

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
DATA_NAME = ONNX_NAME + ".data"
_ROPE_CACHES = ("cos_cache", "sin_cache")


DEFAULT_CONTEXT_LENGTH = 4096


def resolve_context_length(config: dict, requested: int | None) -> int:
    """``export.context_length``, or (null) the model's max_position_embeddings, at most 4096."""
    if requested is not None:
        return requested
    return min(DEFAULT_CONTEXT_LENGTH, config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)


def check_config(config: dict, context_length: int) -> None:
    """One sentence naming the fix when the builder cannot carry this model (ModelError) or the recipe's
    context length does not fit it (RecipeError); both are bad input, found before any weight is converted."""
    from converter.arch import genai_incompatibility

    why = genai_incompatibility(config)
    if why:
        raise ModelError(
            f"export.format 'genai' cannot convert this model: {why}; use export.format: optimum."
        )
    window = config.get("sliding_window")
    if window and context_length < window:
        raise RecipeError(
            f"export.context_length {context_length} is below the model's {window}-token sliding window, which "
            f"onnxruntime-genai's KV buffer must hold; set export.context_length >= {window}."
        )
    limit = config.get("max_position_embeddings")
    if limit and context_length > limit:
        raise RecipeError(
            f"export.context_length {context_length} exceeds the model's max_position_embeddings {limit}; "
            f"set export.context_length <= {limit}."
        )


def build(
    model_dir: Path, out_dir: Path, context_length: int | None, intra_op_threads: int | None = 0
) -> dict[str, Any]:
    """Float32 genai decoder of ``model_dir`` into ``out_dir``. Returns what the manifest records.

    ``context_length`` None: the model's max_position_embeddings, at most 4096. ``intra_op_threads``: see
    set_intra_op_threads."""
    from transformers import AutoConfig

    # every attribute, also those config.json leaves out because they equal the family's defaults
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True).to_dict()
    context_length = resolve_context_length(config, context_length)
    check_config(config, context_length)
    tied = bool(config.get("tie_word_embeddings", False))
    try:
        from onnxruntime_genai import __version__ as og_version
        from onnxruntime_genai.models.builder import create_model
    except ImportError as exc:
        raise ExportError(
            f"export.format 'genai' needs onnxruntime-genai ({short(exc)}); install langconvert's dependencies "
            "again or use export.format: optimum."
        ) from exc
    cache = Path(tempfile.mkdtemp(prefix="genai-cache.", dir=out_dir.parent))
    chatter = io.StringIO()
    import torch

    threads = torch.get_num_threads()
    try:
        # One torch thread: the builder computes the rotary cos/sin tables with torch, whose elementwise ops
        # split a table over the intra-op threads, and in some runs of a process that had resumed a release,
        # the rows computed on the second thread came out up to 1.5e-4 off (positions 256-511 of a 512-row
        # table; the first thread's rows exact), so the same recipe wrote different ONNX bytes. On the calling
        # thread alone every row is computed alike. The builder's other work is copying weights.
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            create_model(
                "langconvert",
                str(model_dir),
                str(out_dir),
                "fp32",
                "cpu",
                str(cache),
                shared_embeddings=tied,
                filename=ONNX_NAME,
                hf_remote=False,
            )
    except Exception as exc:
        log.debug("onnxruntime-genai builder output:\n%s", chatter.getvalue(), exc_info=True)
        raise ExportError(
            f"onnxruntime-genai's builder failed on '{model_dir}' ({short(exc)}); check that the checkpoint "
            "loads with transformers, or use export.format: optimum."
        ) from exc
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(cache, ignore_errors=True)
        gc.collect()  # the builder's model and graph sit in reference cycles: free them before the next pass
    log.debug("onnxruntime-genai builder output:\n%s", chatter.getvalue())
    if not (out_dir / ONNX_NAME).is_file() or not (out_dir / GENAI_CONFIG).is_file():
        raise ExportError(
            f"onnxruntime-genai's builder wrote no {ONNX_NAME} or {GENAI_CONFIG} for '{model_dir}'; use "
            "export.format: optimum."
        )
    cut = _cut_rope_caches(out_dir / ONNX_NAME, context_length)
    set_context_length(out_dir, context_length)
    set_intra_op_threads(out_dir, intra_op_threads)
    return {
        "builder": f"onnxruntime-genai {og_version}",
        "tied_embedding": tied,
        "context_length": context_length,
        "rope_cache_rows_removed": cut,
        "intra_op_threads": intra_op_threads,
    }


def _cut_rope_caches(path: Path, context_length: int) -> int:
    """Keep the first ``context_length`` rows of the builder's (max_positions, head_dim/2) cos/sin caches."""
    from onnx import numpy_helper

    model = load_lazy(path)  # only the caches are read; the weights are copied file to file on save
    removed = 0
    with reading_from(path.parent):
        for i, t in enumerate(model.graph.initializer):
            if t.name.startswith(_ROPE_CACHES) and len(t.dims) == 2 and t.dims[0] > context_length:
                arr = array(t)
                removed += arr.shape[0] - context_length
                model.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(arr[:context_length].copy(), t.name)
                )
    if removed:
        save(model, path, data_name=DATA_NAME, external=True, src_dir=path.parent)
    return removed


def set_context_length(onnx_dir: Path, context_length: int) -> None:
    p = onnx_dir / GENAI_CONFIG
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg["search"]["max_length"] = int(context_length)
    cfg["model"]["context_length"] = int(context_length)
    p.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")


def set_intra_op_threads(onnx_dir: Path, threads: int | None) -> None:
    """``intra_op_num_threads`` in the decoder's session options (export.intra_op_threads).

    The builder writes no thread count, and onnxruntime-genai then decodes on a 2-core machine as fast as with one
    intra-op thread (measured: the same decode 1.8x slower than with 0). 0 hands the choice to onnxruntime itself on the machine
    that loads the artifact, one thread per physical core, so the artifact carries nothing of the machine that
    built it. None leaves the key out."""
    p = onnx_dir / GENAI_CONFIG
    cfg = json.loads(p.read_text(encoding="utf-8"))
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    if threads is None:
        options.pop("intra_op_num_threads", None)
    else:
        options["intra_op_num_threads"] = int(threads)
    p.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
