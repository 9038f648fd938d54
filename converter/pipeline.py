"""run_recipe(): the straight road from recipe to release directory, and nothing else."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.calibrate import calibrate
from converter.errors import GateFailed
from converter.export import export_onnx
from converter.export.gptq import gptq_codes
from converter.lm_eval_hook import LmEvalSuite, prepare_lm_eval
from converter.load import LoadedModel, load_model, load_saved
from converter.manifest import Manifest
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


def run_recipe(recipe: Recipe) -> Path:
    """Run every stage; return the release directory. Raises GateFailed (release kept as <name>.failed)."""
    device = resolve_device(recipe.device)
    m = Manifest.begin(recipe, device)
    try:
        loaded = m.record("load", load_model, recipe.model, recipe.base_dir)
        calib = m.record(
            "calibrate",
            calibrate,
            loaded.tokenizer,
            recipe.languages,
            recipe.calibration,
            recipe.seed,
            recipe.resolve_sources,
        )
        # validate.lm_eval's local tasks, from the held-out text, into the scratch directory (None when unset)
        lm_eval = prepare_lm_eval(recipe, calib, m.scratch)
        ref = m.record("reference", reference, loaded, calib, recipe.validate_cfg, lm_eval)
        m.record("prune", prune, loaded, calib, recipe.prune, device)
        gptq = None
        if recipe.export.enabled and recipe.export.gptq:
            gptq = m.record("gptq", gptq_codes, loaded, calib, recipe.export, device, m.scratch)
        vocab = m.record("trim_vocab", trim_vocab, loaded, calib, recipe.vocab)
        m.record("save", save_checkpoint, loaded, vocab, m.dir("model"))
        loaded.release_weights()  # export and validate read model/ from disk
        export = None
        if recipe.export.enabled:
            export = m.record(
                "export", export_onnx, m.dir("model"), m.dir("onnx"), recipe.export, m.scratch, gptq
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
