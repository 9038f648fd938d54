"""``export.format: optimum``: optimum's decoder-with-past export, loadable by ``ORTModelForCausalLM``.

optimum ``main_export`` (task from arch.py, ``text-generation-with-past``) writes ``model.onnx`` with inputs
``input_ids``, ``attention_mask`` (+ ``position_ids`` for some families) and ``past_key_values.{i}.key/value``,
outputs ``logits`` and ``present.{i}.key/value``. The TorchScript exporter folds ``lm_head.weight.T`` into a
second initializer and optimum's own de-duplication skips families whose embedding is not a plain
``nn.Embedding`` (Gemma 3's ``Gemma3TextScaledWordEmbedding``), so graph.py ties them afterwards; where optimum
did tie them (``MatMul(x, Transpose(E))``) the same edit gives the same layout.
A family optimum registers no ONNX config for (XGLM) gets a plain decoder-with-past config built from the config
keys its FamilySpec names (arch.py).
All optimum usage lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from converter.errors import ExportError
from converter.export import graph
from converter.export.io import ONNX_NAME, load_lazy, reading_from, save, short

log = logging.getLogger(__name__)

# Written by optimum from the loaded model; the checkpoint's copies of everything else are taken verbatim.
OPTIMUM_OWNED = ("config.json", "generation_config.json")


def build(
    model_dir: Path,
    out_dir: Path,
    task: str,
    opset: int | None,
    config_keys: tuple[tuple[str, str], ...] = (),
) -> bool:
    """Float export into ``out_dir``; returns whether a tied embedding is stored once. ``config_keys``: the
    family's FamilySpec.optimum_config_keys (empty: optimum's own ONNX config for the model type)."""
    _optimum_export(model_dir, out_dir, task, opset, config_keys)
    return _tie_float(out_dir / ONNX_NAME)


def _custom_onnx_configs(model_dir: Path, task: str, config_keys: tuple[tuple[str, str], ...]) -> dict | None:
    """``{"model": OnnxConfig}``: a decoder with ``position_ids`` and one (batch, heads, past, head_dim) key and
    value per layer, reading the layer count, heads and width from the config keys ``config_keys`` names."""
    if not config_keys:
        return None
    from optimum.exporters.onnx.model_configs import TextDecoderWithPositionIdsOnnxConfig
    from optimum.utils import NormalizedTextConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    onnx_config = type(
        "FamilyDecoderOnnxConfig",
        (TextDecoderWithPositionIdsOnnxConfig,),
        {"NORMALIZED_CONFIG_CLASS": NormalizedTextConfig.with_args(**dict(config_keys))},
    )
    with_past = task.endswith("-with-past")
    return {
        "model": onnx_config(
            config, task=task.removesuffix("-with-past"), use_past=with_past, use_past_in_inputs=with_past
        )
    }


def _optimum_export(
    model_dir: Path, out_dir: Path, task: str, opset: int | None, config_keys: tuple[tuple[str, str], ...]
) -> None:
    try:
        from optimum.exporters.onnx import main_export

        main_export(
            str(model_dir),
            output=out_dir,
            task=task,
            opset=opset,
            device="cpu",
            do_validation=False,  # validate.py compares against PyTorch itself
            local_files_only=True,
            library_name="transformers",
            custom_onnx_configs=_custom_onnx_configs(model_dir, task, config_keys),
        )
    except ExportError:
        raise
    except Exception as exc:
        log.debug("optimum export failed", exc_info=True)
        hint = "check that the checkpoint loads with transformers and its family is supported by optimum-onnx"
        if opset:
            hint += f", and try export.opset: null instead of {opset}"
        raise ExportError(f"ONNX export of '{model_dir}' failed ({short(exc)}); {hint}.") from exc
    if not (out_dir / ONNX_NAME).is_file():
        raise ExportError(
            f"ONNX export of '{model_dir}' wrote no {ONNX_NAME} (got {sorted(p.name for p in out_dir.iterdir())}); "
            "the task may not match the model, check arch.py's onnx_task."
        )


def _tie_float(path: Path) -> bool:
    try:
        model = load_lazy(path)
        with reading_from(path.parent):
            # optimum's own de-duplication (plain nn.Embedding: GPT-2, OPT, BLOOM, Qwen2, ...) leaves
            # MatMul(x, Transpose(E)); folding it gives the one layout the quantizer and the report know
            graph.fold_transposed_weights(model)
            tied = graph.tie_transposed_embedding(model)
        if tied:  # else nothing is saved, the folded copy included
            save(model, path, src_dir=path.parent)
        return bool(tied)
    except Exception as exc:
        log.debug("tying the embedding failed", exc_info=True)
        raise ExportError(
            f"post-processing the ONNX export '{path}' failed ({short(exc)}); check the disk "
            "space and that onnx can load the file."
        ) from exc
