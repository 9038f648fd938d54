"""reference(): what validation compares the release against, measured on the untouched model.

The stage runs right after calibration, before pruning and trimming change the model in place, so validation
never loads a second copy of the original: it reads these numbers instead. It measures, with the same functions
validation uses for the converted model and the artifact:

- quality: bits per byte and perplexity on every language's held-out text (``validate.score_texts``);
- speed: greedy decode tokens/s and time to first token in PyTorch (``ort.decode_speed_torch``), on the same
  held-out prompts validation times the artifact on;
- size: parameters (total and non-zero), vocabulary, checkpoint bytes;
- downstream tasks (``validate.lm_eval``): lm-evaluation-harness scores (``lm_eval_hook.run_suite``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from converter.calibrate import CalibrationResult
from converter.lm_eval_hook import LmEvalSuite
from converter.load import LoadedModel
from converter.recipe import ValidateConfig

log = logging.getLogger(__name__)


@dataclass
class ReferenceResult:
    quality: dict[str, dict[str, float]]  # language code -> score_texts() of the original
    size: dict[str, int]  # parameters, nonzero_parameters, vocab_size, checkpoint_bytes
    speed: dict[str, Any] | None = None  # decode_speed_torch() of the original, None when timing is off
    lm_eval: dict[str, Any] | None = None  # lm_eval_hook.run_suite() of the original, None without validate.lm_eval
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        bpb = ", ".join(f"{code} {q['bpb']:.3f}" for code, q in self.quality.items())
        head = f"original bits per byte {bpb}" if bpb else "original measured"
        if self.speed:
            head += f"; {self.speed['tokens_per_s']:.1f} tok/s in PyTorch"
        for task, r in (self.lm_eval or {}).items():
            metric = "acc_norm" if "acc_norm" in r["scores"] else next(iter(r["scores"]))
            head += f"; {task} {metric} {r['scores'][metric]:.3f}"
        out = {"headline": head, "quality": self.quality, "size": self.size, "speed": self.speed}
        if self.lm_eval is not None:
            out["lm_eval"] = self.lm_eval
        return out


def speed_prompts(tokenizer: Any, calib: CalibrationResult, cfg: ValidateConfig) -> list[list[int]]:
    """The timed prompts: the first 32 tokens of the first ``cfg.speed_prompts`` held-out target documents."""
    docs = [doc for d in calib.languages.values() if d.keep_vocab for doc in d.heldout_docs][
        : cfg.speed_prompts
    ]
    if not docs:
        return []
    return [list(e[:32]) for e in tokenizer(docs, add_special_tokens=True)["input_ids"]]


def reference(
    loaded: LoadedModel, calib: CalibrationResult, cfg: ValidateConfig, lm_eval: LmEvalSuite | None = None
) -> ReferenceResult:
    """Score and time ``loaded`` (not yet pruned or trimmed) on the held-out text of every language, and on the
    ``lm_eval`` suite's tasks when there is one."""
    from converter import ort
    from converter.validate import dir_bytes, param_counts, score_texts, torch_logits_fn

    fn = torch_logits_fn(loaded.model)
    vocab_rows = loaded.model.get_output_embeddings().weight.shape[0]
    quality = {
        code: score_texts(fn, loaded.tokenizer, d.heldout_docs, cfg.eval_seq_len, vocab_size=vocab_rows)
        for code, d in calib.languages.items()
    }
    size = {
        "parameters": loaded.original_num_parameters,
        "nonzero_parameters": param_counts(loaded.model)["nonzero"],
        "vocab_size": loaded.original_vocab_size,
        "checkpoint_bytes": dir_bytes(loaded.checkpoint_dir, "*.safetensors"),
    }
    speed = None
    prompts = speed_prompts(loaded.tokenizer, calib, cfg) if cfg.speed_prompts else []
    if prompts:
        speed = ort.decode_speed_torch(
            loaded.model, [torch.tensor([p]) for p in prompts], cfg.speed_new_tokens
        )
    scores = None
    if lm_eval is not None:
        from converter.lm_eval_hook import run_suite

        scores = run_suite(loaded.model, loaded.tokenizer, lm_eval)
    return ReferenceResult(quality=quality, size=size, speed=speed, lm_eval=scores)
