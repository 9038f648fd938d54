"""Calibration accumulators shared by the linears of a layer that read the same input tensor.

q/k/v read the attention norm's output, gate/up the FFN norm's: the statistics of that input (SparseGPT's
Hessian X^T X, Wanda's Σ x²) are the same for each of them, so one accumulator per distinct input does the
work once. For a Gemma 3 or Llama layer that is 4 accumulations instead of 7; SparseGPT's Hessians,
O(tokens · in²) each, are most of its time after the forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


class SharedInputs:
    """One accumulator (``make(name)``, anything with ``add_batch(x)``) per distinct input among a layer's linears.

    Grouping is by the input tensor's storage (data pointer, shape, strides, dtype) and its version counter,
    which every in-place write bumps, within one call of the layer; ``new_batch()`` must run before each call
    (a layer pre-hook, or _run_layer's before_batch). The tensors seen in the current call are held until then,
    so no later tensor of the same call can reuse their memory and pass for them, and a buffer written in place
    between two linears counts as a new input. The groups are fixed by the first call; a later call that feeds
    a linear the input of another group is a ValueError.
    """

    def __init__(self, make: Callable[[str], Any]) -> None:
        self._make = make
        self.of: dict[str, Any] = {}  # linear name -> its (possibly shared) accumulator
        self._seen: dict[tuple, tuple[torch.Tensor, Any]] = {}  # this call's inputs

    def new_batch(self) -> None:
        self._seen = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
        seen = self._seen.get(key)
        acc = self.of.get(name)
        if acc is None:  # first call: join the group of an identical input, or start one
            acc = seen[1] if seen is not None else self._make(name)
            self.of[name] = acc
        if seen is not None:
            if seen[1] is not acc:
                raise ValueError(f"linear '{name}' shares its input with another group than on the first batch")
            return  # the group's accumulator already holds this input
        acc.add_batch(x)
        self._seen[key] = (x, acc)

    @property
    def groups(self) -> int:
        return len({id(a) for a in self.of.values()})


@contextlib.contextmanager
def float32_products(device_type: str, compute_dtype: str) -> Iterator[None]:
    """Matrix products of float32 tensors inside the block: exact float32 for compute_dtype float32; for
    bfloat16, reduced-precision inputs with float32 sums and a float32 result: on CPU oneDNN's bf16 math mode
    (inputs rounded to bfloat16; about 3x faster for XᵀX with AMX), on CUDA TF32 (10-bit mantissas). XᵀX then is the exact Gram matrix of the rounded
    inputs, so it stays positive semi-definite, which bfloat16 outputs (autocast's) do not. Autocast is off in
    the block either way."""
    backend, mode = None, None
    if compute_dtype == "bfloat16" and device_type == "cpu":
        backend, mode = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), "bf16"
    elif compute_dtype == "bfloat16" and device_type == "cuda":
        backend, mode = getattr(torch.backends.cuda, "matmul", None), "tf32"
    old = getattr(backend, "fp32_precision", None)
    if old is not None:
        backend.fp32_precision = mode
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if old is not None:
            backend.fp32_precision = old
