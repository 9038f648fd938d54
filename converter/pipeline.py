"""run_recipe(): the straight road from recipe to release directory, and nothing else."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.calibrate import calibrate
from converter.errors import GateFailed
from converter.export import export_onnx
from converter.export.gptq import gptq_codes
from converter.export.quantize import check_linear_bits
from converter.lm_eval_hook import LmEvalSuite, prepare_lm_eval
from converter.load import LoadedModel, load_model, load_saved
from converter.manifest import Manifest, map_large_allocations
from converter.prune import prune
from converter.recipe import Recipe
from converter.reference import ReferenceResult, reference
from converter.report import write_report
from converter.validate import validate
from converter.vocab import VocabResult, trim_vocab

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from converter.errors import RecipeError

        raise RecipeError("device is 'cuda' but torch sees no CUDA device; set device: auto or cpu.")
    return requested


@dataclass
class SaveResult:
    model_dir: Path
    bytes: int

    def summary(self) -> dict[str, Any]:
        return {"headline": f"{self.bytes / 1e6:,.1f} MB in {self.model_dir.name}/", "bytes": self.bytes}


def save_checkpoint(loaded: LoadedModel, vocab: VocabResult, model_dir: Path) -> SaveResult:
    """The converted HF checkpoint: safetensors, configs, trimmed tokenizer and token_map.json."""
    loaded.model.save_pretrained(model_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(model_dir)
    vocab.write_token_map(model_dir / "token_map.json")
    return SaveResult(model_dir, sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()))


def run_validation(
    recipe: Recipe,
    ref: ReferenceResult,
    original_tokenizer,
    vocab: VocabResult,
    calib,
    model_dir: Path,
    export,
    lm_eval: LmEvalSuite | None = None,
):
    converted = load_saved(model_dir, recipe.model)  # what ships, read back from model/
    return validate(
        ref,
        original_tokenizer,
        converted,
        vocab.token_map if vocab.trimmed else None,
        calib,
        recipe.validate_cfg,
        model_dir,
        onnx_dir=export.onnx_dir if export else None,
        float_onnx_dir=export.float_dir if export else None,
        parity_gated={
            lang.code
            for lang in recipe.languages
            if lang.keep_vocab
            and (not recipe.vocab.enabled or (recipe.vocab.keep_scripts and lang.script_tokens))
        },
        runtime=export.runtime if export else None,
        script_check=vocab.script_check if vocab.trimmed else None,
        lm_eval=lm_eval,
    )


# The validate fields the reference stage reads (the others are gates, applied later)
_REFERENCE_FIELDS = ("speed_prompts", "speed_new_tokens", "eval_seq_len", "lm_eval")
# Stages that change the model in memory: their work survives only through `save`'s model/
_MODEL_STAGES = ("prune", "gptq", "trim_vocab")


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_stamp(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        return [str(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def stage_keys(recipe: Recipe, device: str) -> dict[str, str]:
    """Per stage, a digest of everything its result depends on: the recipe sections it reads, the identity of
    the input files, the keys of the stages before it, and langconvert's version. --resume reuses a stage of an
    unfinished run only when its key is unchanged."""
    from importlib import metadata

    from converter.load import resolve_source

    r = recipe.to_dict()
    try:
        version = metadata.version("langconvert")
    except metadata.PackageNotFoundError:
        version = "unknown"
    src = resolve_source(recipe.model.source, recipe.base_dir)
    model_files = sorted(src.glob("*")) if isinstance(src, Path) and src.is_dir() else [src]
    load = _digest(version, r["model"], [_file_stamp(Path(f)) for f in model_files])
    sources = [
        _file_stamp(f) for lang in recipe.languages for f in recipe.resolve_sources(lang.sources, lang.code)
    ]
    calibrate = _digest(load, r["languages"], r["calibration"], recipe.seed, sources)
    reference = _digest(calibrate, {k: r["validate"].get(k) for k in _REFERENCE_FIELDS})
    prune = _digest(calibrate, r["prune"], device)
    gptq = _digest(prune, r["export"], device)
    trim = _digest(gptq if recipe.export.enabled and recipe.export.gptq else prune, r["vocab"])
    save = _digest(trim)
    export = _digest(save, r["export"])
    keys = {
        "load": load,
        "calibrate": calibrate,
        "reference": reference,
        "prune": prune,
        "gptq": gptq,
        "trim_vocab": trim,
        "save": save,
        "export": export,
    }
    return keys


def plan_reuse(reusable: set[str]) -> set[str]:
    """Which reusable stages a resumed run may really skip: the pruned and trimmed weights live only in memory
    until `save` writes model/, so those stages are skipped only with `save`; and the original weights are
    needed (load runs) unless reference and everything up to save are skipped."""
    reuse = set(reusable)
    if "save" not in reuse:
        reuse -= set(_MODEL_STAGES)
    if not {"reference", "save"} <= reuse:
        reuse.discard("load")
    if "save" not in reuse:
        reuse.discard("export")  # exported from a model/ this run writes again
    return reuse


def run_recipe(recipe: Recipe, resume: bool = False) -> Path:
    """Run every stage; return the release directory. Raises GateFailed (release kept as <name>.failed). With
    ``resume``, the stages an unfinished run of the same inputs finished are taken from it."""
    device = resolve_device(recipe.device)
    keys = stage_keys(recipe, device)
    m = Manifest.begin(recipe, device, resume)
    m.reuse = plan_reuse(m.reusable(keys)) if resume else set()
    map_large_allocations()  # 1 MiB, except during the layer walks (see its doc)
    try:
        if "save" not in m.reuse:
            m.fresh_dir("model")
        if "export" not in m.reuse:
            shutil.rmtree(m.work / "onnx", ignore_errors=True)
        loaded = m.record("load", load_model, recipe.model, recipe.base_dir, key=keys["load"])
        if recipe.export.enabled and recipe.export.linear_bits:  # a pattern typo fails now, not after prune
            check_linear_bits(loaded.model, recipe.export.linear_bits)
        calib = m.record(
            "calibrate",
            calibrate,
            loaded.tokenizer,
            recipe.languages,
            recipe.calibration,
            recipe.seed,
            recipe.resolve_sources,
            key=keys["calibrate"],
        )
        # validate.lm_eval's local tasks, from the held-out text, into the scratch directory (None when unset)
        lm_eval = prepare_lm_eval(recipe, calib, m.scratch)
        ref = m.record("reference", reference, loaded, calib, recipe.validate_cfg, lm_eval, key=keys["reference"])
        map_large_allocations(32 << 20)
        m.record("prune", prune, loaded, calib, recipe.prune, device, key=keys["prune"])
        gptq = None
        if recipe.export.enabled and recipe.export.gptq:
            gptq = m.record("gptq", gptq_codes, loaded, calib, recipe.export, device, m.scratch, key=keys["gptq"])
        map_large_allocations()  # for the stages after the layer walks (see its doc)
        vocab = m.record("trim_vocab", trim_vocab, loaded, calib, recipe.vocab, key=keys["trim_vocab"])
        m.record("save", save_checkpoint, loaded, vocab, m.dir("model"), key=keys["save"])
        loaded.release_weights()  # export and validate read model/ from disk
        export = None
        if recipe.export.enabled:
            export = m.record(
                "export",
                export_onnx,
                m.dir("model"),
                m.dir("onnx"),
                recipe.export,
                m.scratch,
                gptq,
                key=keys["export"],
            )
        result = m.record(
            "validate",
            run_validation,
            recipe,
            ref,
            loaded.original_tokenizer,
            vocab,
            calib,
            m.dir("model"),
            export,
            lm_eval,
        )
    except BaseException as exc:
        where = m.abandon(exc)
        log.error("run failed; partial output kept for inspection in %s", where)
        raise
    if result.failed:
        where = m.finish("gate_failed", write_report)
        names = ", ".join(c.name for c in result.failed)
        raise GateFailed(f"validation gates failed ({names}); see {where / 'report.md'}.")
    return m.finish("ok", write_report)
