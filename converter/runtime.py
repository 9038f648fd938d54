"""The shipped artifact in the runtime it is built for: onnxruntime-genai for ``export.format: genai``.

:class:`GenaiDecoder` wraps ``onnxruntime_genai.Model`` with the same three operations that converter.ort
offers for plain onnxruntime sessions, measured the same way, so validation and benchmarks treat both formats
alike:

- ``logits(ids)``: one prefill of the whole sequence (batch 1) -> float32 logits (S, V);
- ``greedy(prompt, n)``: exactly ``n`` greedy tokens with the runtime's own KV cache (no EOS stop);
- ``decode_speed(prompts, n)``: after warm-up, per prompt, time to first token (prefill and the first token)
  and the steady rate of the remaining ``n - 1`` tokens, each a single-token step.

Every generator gets the artifact's full KV capacity, ``search.max_length`` in genai_config.json (export sets it
from ``export.context_length``), as a user's generator does by default: onnxruntime-genai's GroupQueryAttention
graph for Gemma 3 needs a buffer at least as long as the 512-token sliding window. A sequence longer than the
capacity is an error, not a silent truncation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


def is_genai_dir(path: Path | str) -> bool:
    return (Path(path) / GENAI_CONFIG).is_file()


class GenaiDecoder:
    runtime = "onnxruntime-genai"

    def __init__(self, model_dir: Path | str, max_length: int | None = None):
        """``max_length``: KV capacity per generator instead of the artifact's own (benchmarks use it to give
        every artifact the same)."""
        import onnxruntime_genai as og

        self.dir = Path(model_dir)
        self._og = og
        self.model = og.Model(str(self.dir))
        cfg = json.loads((self.dir / GENAI_CONFIG).read_text(encoding="utf-8"))
        self.max_length = int(max_length or cfg["search"]["max_length"])

    def _generator(self, total: int) -> Any:
        if total > self.max_length:
            raise ValueError(
                f"sequence of {total} tokens exceeds the artifact's context length {self.max_length} "
                "(export.context_length)"
            )
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        return self._og.Generator(self.model, params)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(ids)
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)  # (1, S, V)
        return out.reshape(-1, out.shape[-1])[-len(ids) :]

    def _start(self, prompt: Sequence[int]):
        """A ``next_token()`` closure: the first call runs the prefill and picks a token, later calls one step."""
        ids = [int(i) for i in prompt]
        gen = self._generator(len(ids) + 1)
        state = {"started": False}

        def step() -> int:
            if not state["started"]:
                gen.append_tokens(ids)
                state["started"] = True
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        return step

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        if len(prompt) + n > self.max_length:
            self._generator(len(prompt) + n)  # raises: too long for the artifact
        step = self._start(prompt)
        return [step() for _ in range(n)]

    def decode_speed(
        self, prompts: Sequence[Sequence[int]], new_tokens: int, warmup: int = 1
    ) -> dict[str, Any]:
        """Timed exactly like converter.ort's loops (the same function), the prefill inside the first token."""
        from converter.ort import timed_decode

        return {**timed_decode(self._start, prompts, new_tokens, warmup), "runtime": self.runtime}


class OrtArtifact:
    """A plain onnxruntime session (optimum format, or any float graph) behind GenaiDecoder's three operations."""

    runtime = "onnxruntime"

    def __init__(self, onnx_dir: Path | str):
        from converter import ort

        self._ort = ort
        self.dir = Path(onnx_dir)
        self.decoder = ort._decoder(self.dir)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        return self._ort.onnx_logits(self.decoder, torch.tensor([list(ids)]))[0].numpy()

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        import torch

        return self._ort.greedy_generate_onnx(self.decoder, torch.tensor([list(prompt)]), n)

    def decode_speed(
        self, prompts: Sequence[Sequence[int]], new_tokens: int, warmup: int = 1
    ) -> dict[str, Any]:
        import torch

        out = self._ort.decode_speed_onnx(
            self.decoder, [torch.tensor([list(p)]) for p in prompts], new_tokens, warmup
        )
        out["runtime"] = self.runtime
        return out


def open_artifact(onnx_dir: Path | str, runtime: str | None = None) -> GenaiDecoder | OrtArtifact:
    """The artifact in ``onnx_dir`` in its own runtime: onnxruntime-genai when it has a genai_config.json,
    plain onnxruntime otherwise (or as ``runtime`` says: 'onnxruntime-genai' / 'onnxruntime')."""
    use_genai = is_genai_dir(onnx_dir) if runtime is None else runtime == "onnxruntime-genai"
    return GenaiDecoder(onnx_dir) if use_genai else OrtArtifact(onnx_dir)


def artifact_logits_fn(artifact: GenaiDecoder | OrtArtifact):
    """``logits_fn(ids (B, S), mask (B, S)) -> (B, S, V)`` for validate.score_texts, one row at a time
    (right padding: each row's first mask.sum() positions are real)."""
    import torch

    def fn(ids: Any, mask: Any) -> Any:
        if ids.shape[0] == 1 and int(mask.sum()) == ids.shape[1]:  # one unpadded row: no copy
            return torch.from_numpy(artifact.logits(ids[0].tolist())[None])
        full = None  # (B, S, V), filled row by row
        for j, (row, m) in enumerate(zip(ids, mask)):
            n = int(m.sum())
            lg = artifact.logits(row[:n].tolist())
            if full is None:
                full = np.zeros((ids.shape[0], ids.shape[1], lg.shape[-1]), np.float32)
            full[j, :n] = lg
        return torch.from_numpy(full)

    return fn
