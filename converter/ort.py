"""onnxruntime helpers for validation and benchmarks: logits, greedy decoding with KV cache, decode speed.

Plain ``onnxruntime.InferenceSession`` (no optimum) so what is measured is the graph export.py wrote. The graph
(optimum's decoder-with-past layout) takes ``input_ids`` (B, S), ``attention_mask`` (B, P+S), optionally
``position_ids`` (B, S) and ``past_key_values.{i}.key/value`` (B, kv_heads, P, head_dim); it returns ``logits``
(B, S, V) and ``present.{i}.key/value`` (B, kv_heads, P+S, head_dim).

Greedy decoding never stops at EOS, in ONNX and in PyTorch alike: both produce exactly ``max_new_tokens`` so
token sequences and timings compare one to one. Speed is measured identically for both: after ``warmup`` runs,
per prompt, time to first token (the prefill forward + argmax) and the steady decode rate of the remaining
tokens, each step feeding only the new token and the cache, timed with ``time.perf_counter``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxDecoder:
    """One ONNX decoder session plus what is needed to feed it: input names, empty-cache shapes, dtypes."""

    def __init__(self, session: Any, path: Path):
        self.session = session
        self.path = path
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = list(inputs)
        self.has_position_ids = "position_ids" in inputs
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        # (kv_heads, head_dim) are static in the exported shapes; batch and past length are symbolic
        self.past_shapes = {
            n: tuple(inputs[n].shape[1:2]) + tuple(inputs[n].shape[3:]) for n in self.past_names
        }
        self.past_dtype = {n: _ORT_TO_NP.get(inputs[n].type, np.float32) for n in self.past_names}
        self.output_names = [o.name for o in session.get_outputs()]
        self._present_to_past = {
            o: "past_key_values." + o.removeprefix("present.")
            for o in self.output_names
            if o.startswith("present.")
        }

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {
            n: np.zeros((batch, shape[0], 0, *shape[1:]), dtype=self.past_dtype[n])
            for n, shape in self.past_shapes.items()
        }

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: ids (B, S), mask (B, P+S), past from a previous call -> logits (B, S, V), new past."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            # same rule as transformers' generate(): cumulative count of attended positions, pads at 1
            pos = np.cumsum(attention_mask, axis=-1) - 1
            pos[attention_mask == 0] = 1
            feed["position_ids"] = pos[:, -input_ids.shape[1] :]
        feed.update(past if past is not None else self.empty_past(input_ids.shape[0]))
        outs = self.session.run(None, feed)
        named = dict(zip(self.output_names, outs, strict=True))
        new_past = {self._present_to_past[k]: v for k, v in named.items() if k in self._present_to_past}
        return named["logits"], new_past


def load_session(
    onnx_dir: Path | str, providers: Sequence[str] | None = None, mapped: bool = False
) -> OnnxDecoder:
    """An :class:`OnnxDecoder` on ``onnx_dir/model.onnx``. CUDA only when asked for and available, else CPU.

    ``mapped``: no weight prepacking, so the CPU provider computes from the external data file's mapping (page
    cache the kernel can reclaim) instead of from a packed copy of every weight in process memory; slower, for
    checks, not for timing."""
    import onnxruntime as ort

    path = Path(onnx_dir)
    path = path / "model.onnx" if path.is_dir() else path
    available = set(ort.get_available_providers())
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    dropped = [p for p in wanted if p not in available]
    if dropped:
        log.warning("onnxruntime: providers %s are not available here; using %s", dropped, chosen or ["CPU"])
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns about every unused initializer and CPU-placed shape op otherwise
    if mapped:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    return OnnxDecoder(session, path)


# Helpers given a directory reuse its session: validation calls them many times on the same export and a session
# over a 1 GB graph takes seconds to build. Keyed by the file's path, size and mtime; the last two are kept.
_SESSION_CACHE: dict[tuple[str, int, int], OnnxDecoder] = {}
_SESSION_CACHE_SIZE = 2


def clear_session_cache() -> None:
    """Drop the cached sessions (frees their memory)."""
    _SESSION_CACHE.clear()


def _decoder(onnx: OnnxDecoder | Path | str) -> OnnxDecoder:
    if isinstance(onnx, OnnxDecoder):
        return onnx
    path = Path(onnx)
    path = path / "model.onnx" if path.is_dir() else path
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SESSION_CACHE:
        while len(_SESSION_CACHE) >= _SESSION_CACHE_SIZE:
            _SESSION_CACHE.pop(next(iter(_SESSION_CACHE)))
        _SESSION_CACHE[key] = load_session(path)
    dec = _SESSION_CACHE.pop(key)  # re-insert: most recently used last
    _SESSION_CACHE[key] = dec
    return dec


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def onnx_logits(
    onnx: OnnxDecoder | Path | str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full forward without past: ids (B, S) -> float32 logits (B, S, V) as a CPU tensor."""
    dec = _decoder(onnx)
    ids = _np(input_ids).astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else _np(attention_mask).astype(np.int64)
    logits, _ = dec.forward(ids, mask)
    return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


# --------------------------------------------------------------------------------------------------- greedy


def _onnx_stepper(dec: OnnxDecoder) -> Callable[[torch.Tensor], Callable[[], int]]:
    """prompt (1, S) -> a ``next_token()`` closure: first call prefills, later calls feed only the last token."""

    def start(prompt: torch.Tensor) -> Callable[[], int]:
        ids = _np(prompt).astype(np.int64).reshape(1, -1)
        state: dict[str, Any] = {"past": None, "mask": np.ones_like(ids), "next": ids}

        def step() -> int:
            logits, state["past"] = dec.forward(state["next"], state["mask"], state["past"])
            tok = int(logits[0, -1].argmax())
            state["next"] = np.array([[tok]], dtype=np.int64)
            state["mask"] = np.concatenate([state["mask"], np.ones((1, 1), np.int64)], axis=1)
            return tok

        return step

    return start


def _torch_stepper(model: Any) -> Callable[[torch.Tensor], Callable[[], int]]:
    import inspect

    device = next(model.parameters()).device
    # only the last position's logits are read: a 640-token prefill then costs one vocabulary row, not 640
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )

    def start(prompt: torch.Tensor) -> Callable[[], int]:
        ids = prompt.reshape(1, -1).to(device=device, dtype=torch.long)
        state: dict[str, Any] = {"past": None, "mask": torch.ones_like(ids), "next": ids}

        @torch.inference_mode()
        def step() -> int:
            out = model(
                input_ids=state["next"],
                attention_mask=state["mask"],
                past_key_values=state["past"],
                use_cache=True,
                **last_only,
            )
            state["past"] = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            state["next"] = torch.tensor([[tok]], device=device)
            state["mask"] = torch.cat(
                [state["mask"], torch.ones((1, 1), dtype=torch.long, device=device)], dim=1
            )
            return tok

        return step

    return start


def _greedy(start: Callable[[torch.Tensor], Callable[[], int]], prompt: torch.Tensor, n: int) -> list[int]:
    step = start(prompt)
    return [step() for _ in range(n)]


def greedy_generate_onnx(
    onnx: OnnxDecoder | Path | str, input_ids: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """Exactly ``max_new_tokens`` greedy tokens (no EOS stop) for one prompt (1, S), KV cache, new token only."""
    return _greedy(_onnx_stepper(_decoder(onnx)), input_ids, max_new_tokens)


def greedy_generate_torch(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The PyTorch twin of :func:`greedy_generate_onnx`: same loop, ``past_key_values``, no EOS stop."""
    model.eval()
    return _greedy(_torch_stepper(model), input_ids, max_new_tokens)


# --------------------------------------------------------------------------------------------------- speed


def timed_decode(
    start: Callable[[Any], Callable[[], int]],
    prompts: Sequence[Any],
    new_tokens: int,
    warmup: int,
) -> dict[str, Any]:
    """The one timing loop for every runtime: ``start(prompt)`` returns a ``next_token()`` closure whose first
    call runs the prefill (see the module doc for what is measured)."""
    if not prompts:
        raise ValueError("decode speed needs at least one prompt")
    if new_tokens < 2:
        raise ValueError("decode speed needs new_tokens >= 2 (the first token is the prefill)")
    for i in range(warmup):
        _greedy(start, prompts[i % len(prompts)], new_tokens)
    ttfts, decode_s, total_s = [], [], []
    for prompt in prompts:
        step = start(prompt)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            step()
        t2 = time.perf_counter()
        ttfts.append(t1 - t0)
        decode_s.append(t2 - t1)
        total_s.append(t2 - t0)
    decoded = (new_tokens - 1) * len(prompts)
    return {
        "tokens_per_s": decoded / sum(decode_s),  # steady decode rate, prefill excluded
        "ttft_s": float(np.mean(ttfts)),  # mean time to first token (prefill + argmax)
        "end_to_end_tokens_per_s": new_tokens * len(prompts) / sum(total_s),
        "new_tokens": new_tokens,
        "runs": len(prompts),
    }


def decode_speed_onnx(
    onnx: OnnxDecoder | Path | str, prompts: Sequence[torch.Tensor], new_tokens: int, warmup: int = 1
) -> dict[str, Any]:
    """Greedy decode timing of the ONNX model; see the module doc for what is measured."""
    return timed_decode(_onnx_stepper(_decoder(onnx)), prompts, new_tokens, warmup)


def decode_speed_torch(
    model: Any, prompts: Sequence[torch.Tensor], new_tokens: int, warmup: int = 1
) -> dict[str, Any]:
    """Greedy decode timing of the PyTorch model, measured exactly like :func:`decode_speed_onnx`."""
    model.eval()
    return timed_decode(_torch_stepper(model), prompts, new_tokens, warmup)
