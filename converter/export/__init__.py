"""export_onnx(): a saved HF checkpoint -> the shipped ONNX decoder with KV cache, in one of two formats.

- ``genai`` (genai.py): onnxruntime-genai's fused decoder (GroupQueryAttention, fused norms, genai_config.json),
  run with ``onnxruntime_genai``; the fastest onnxruntime path on CPU.
- ``optimum`` (optimum.py): optimum's decoder-with-past, loadable by ``ORTModelForCausalLM``.

Both first write a float32 graph whose tied embedding is stored once (graph.py). With ``export.quantize`` the
float graph is kept in the run's work directory for parity checks and a quantized copy is shipped
(quantize.py): weight-only MatMulNBits ``int8`` / ``int4`` (the lm_head optionally at 8 bits), or
``int8-dynamic``. Everything is written into a temporary sibling directory and renamed at the end (house
rule 6).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import ExportError
from converter.export.io import ONNX_NAME, copy_non_onnx, copy_side_files, onnx_bytes, opset_of, staging
from converter.recipe import ExportConfig

__all__ = ["ExportResult", "ONNX_NAME", "export_onnx", "onnx_bytes"]

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    onnx_dir: Path  # the shipped ONNX directory (model.onnx [+ data], config, tokenizer)
    float_dir: Path  # the float export, for parity checks; == onnx_dir when not quantized
    quantized: bool
    bytes: int  # bytes on disk of the shipped ONNX files (model.onnx + external data)
    seconds: float
    format: str = "optimum"
    quantize: str = "none"
    float_bytes: int = 0
    opset: int | None = None
    files: list[str] = field(default_factory=list)
    tied_embedding: bool = False  # the embedding is stored once, shared with the lm_head
    quantization: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return "onnxruntime-genai" if self.format == "genai" else "onnxruntime"

    def summary(self) -> dict[str, Any]:
        mb = self.bytes / 1e6
        head = f"{self.format} {self.quantize if self.quantized else 'float32'} ONNX {mb:.1f} MB"
        if self.quantized:
            head += f" ({self.bytes / max(self.float_bytes, 1):.0%} of float)"
        return {
            "headline": head + f" in {self.seconds:.1f}s",
            "format": self.format,
            "runtime": self.runtime,
            "quantize": self.quantize,
            "onnx_dir": str(self.onnx_dir),
            "float_dir": str(self.float_dir),
            "quantized": self.quantized,
            "bytes": self.bytes,
            "float_bytes": self.float_bytes,
            "seconds": round(self.seconds, 3),
            "opset": self.opset,
            "files": self.files,
            "tied_embedding": self.tied_embedding,
            "quantization": self.quantization,
            "build": self.build,
        }


def export_onnx(
    model_dir: Path, onnx_dir: Path, cfg: ExportConfig, work_dir: Path, gptq: Any = None
) -> ExportResult:
    """Export the checkpoint in ``model_dir`` to ``onnx_dir``; quantized exports keep the float one in ``work_dir``.
    ``gptq``: the gptq stage's result (export.gptq), whose codes replace round to nearest for the layers."""
    from converter.export import genai, optimum, quantize

    model_dir, onnx_dir, work_dir = Path(model_dir), Path(onnx_dir), Path(work_dir)
    if not cfg.enabled:
        raise ExportError("export_onnx was called with export.enabled: false; skip the export stage instead.")
    spec = _check_model_dir(model_dir, cfg.format)
    if onnx_dir.resolve() == model_dir.resolve():
        raise ExportError(f"the ONNX directory '{onnx_dir}' is the model directory; export into a separate one.")
    t0 = time.perf_counter()
    log.info("export: start (%s, format=%s, quantize=%s)", model_dir, cfg.format, cfg.quantize)
    # export.linear_bits resolved on the checkpoint first: a pattern that matches nothing fails before the build
    bits_for = quantize.bits_by_weight(model_dir, cfg.linear_bits) if cfg.linear_bits else None
    quantized = cfg.quantize != "none"
    float_dir = work_dir / "onnx-float" if quantized else onnx_dir

    build: dict[str, Any] = {}
    with staging(float_dir) as tmp:
        if cfg.format == "genai":
            build = genai.build(model_dir, tmp, cfg.context_length, cfg.intra_op_threads)
            tied = build["tied_embedding"]
            copy_side_files(model_dir, tmp, keep=(genai.GENAI_CONFIG,))
        else:
            tied = optimum.build(model_dir, tmp, spec.onnx_task, cfg.opset, spec.optimum_config_keys)
            copy_side_files(model_dir, tmp, keep=optimum.OPTIMUM_OWNED)
    float_bytes = onnx_bytes(float_dir)

    quant_info: dict[str, Any] = {}
    if quantized:
        with staging(onnx_dir) as tmp:
            if cfg.quantize == "int8-dynamic":
                quant_info = quantize.quantize_dynamic_int8(
                    float_dir / ONNX_NAME, tmp / ONNX_NAME, work_dir, reduce_range=cfg.int8_reduce_range
                )
            else:
                quant_info = quantize.quantize_weight_only_file(
                    float_dir / ONNX_NAME,
                    tmp / ONNX_NAME,
                    bits=8 if cfg.quantize == "int8" else 4,
                    block_size=cfg.block_size,
                    accuracy_level=cfg.accuracy_level,
                    head_bits=cfg.lm_head_bits,
                    scale_search=cfg.scale_search,
                    codes_for=gptq.load() if gptq is not None else None,
                    bits_for=bits_for,
                    codes_bits=gptq.bits_of() if gptq is not None else None,
                )
            copy_non_onnx(float_dir, tmp)

    result = ExportResult(
        onnx_dir=onnx_dir,
        float_dir=float_dir,
        quantized=quantized,
        bytes=onnx_bytes(onnx_dir),
        seconds=time.perf_counter() - t0,
        format=cfg.format,
        quantize=cfg.quantize,
        float_bytes=float_bytes,
        opset=opset_of(onnx_dir / ONNX_NAME),
        files=sorted(p.name for p in onnx_dir.iterdir() if p.is_file()),
        tied_embedding=bool(tied),
        quantization=quant_info,
        build=build,
    )
    log.debug("export: done in %.1fs: %s", result.seconds, result.summary()["headline"])  # the manifest logs it
    return result


def _check_model_dir(model_dir: Path, export_format: str):
    """The checkpoint's FamilySpec; ExportError for a directory that is not a saved checkpoint, ModelError for a
    family ``export_format`` cannot carry."""
    from converter.arch import spec_for
    from converter.errors import ModelError

    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(
            f"cannot export '{model_dir}': it has no config.json; pass a directory written by save_pretrained "
            "(config.json + safetensors + tokenizer files)."
        )
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8"))["model_type"]
    except (ValueError, KeyError) as exc:
        raise ExportError(
            f"cannot export '{model_dir}': its config.json is not valid JSON with a model_type; re-save the model."
        ) from exc
    if not any(p.suffix in (".safetensors", ".bin") for p in model_dir.iterdir()):
        raise ExportError(
            f"cannot export '{model_dir}': it holds no weights (*.safetensors); re-save the model with "
            "save_pretrained."
        )
    spec = spec_for(model_type)
    problem = spec.format_problem(export_format)
    if problem:
        raise ModelError(problem)
    return spec
