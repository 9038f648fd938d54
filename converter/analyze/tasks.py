"""Per-language analysis work, as independent tasks run in local processes or as Ray tasks.

A task is one language's (or one prompt set's) calibration windows. It loads the model itself (on CUDA when its
worker has one), walks the decoder layers with the same :class:`LayerWalk` as ``prune`` and ``gptq`` (dense: no
weight changes), and returns only numbers: packed Wanda keep-masks, per-expert statistics from the same
MoE-fication as structured pruning, hidden-state norms. The torch thread count travels in the task, so a task
computes the same numbers wherever it runs.

Local runs use a process pool over all cores (``workers`` processes with ``cores // workers`` threads each,
fewer workers when memory would not hold that many model copies); ``ray_address`` sends the same tasks to a Ray
cluster ("local" starts one in this process), each asking for its thread count in CPUs and one GPU when the
cluster has any. On a cluster every worker must reach the model: a shared path or a Hub id.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

from converter.errors import ConvertError, DataError

log = logging.getLogger(__name__)

WANTS = ("masks", "experts", "hidden")
_LOADED: dict[tuple, Any] = {}  # this process's loaded model, by ModelSpec fields


@dataclass
class Task:
    name: str  # language code or prompt-set name
    model: dict[str, Any]  # ModelSpec fields; source is a local checkpoint directory or a Hub id
    windows: np.ndarray  # (n, seq_len) int64 token ids
    want: tuple[str, ...]  # subset of WANTS
    sparsity: float = 0.5  # masks: share of each row's weights pruned
    experts: int = 64  # experts per FFN (MoE-fication)
    batch_size: int = 8
    threads: int = 1
    device: str = "auto"  # "auto": cuda when the worker has it, else cpu
    meta: dict[str, Any] = field(default_factory=dict)  # carried to the result untouched


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_workers(n_tasks: int, task_bytes: int | None = None) -> int:
    """As many processes as cores and tasks allow, but no more model copies than ~80% of free memory holds."""
    n = max(1, min(n_tasks, cpu_count()))
    avail = _available_bytes()
    if task_bytes and avail:
        n = max(1, min(n, int(0.8 * avail // task_bytes)))
    return n


def measure(task: Task) -> dict[str, Any]:
    """Run one task: load the model, walk its layers on the task's windows, return the numbers asked for.

    Result keys: ``name``, ``meta``, ``tokens``; with "masks": ``masks`` (uint8, the Wanda keep-masks of every
    prunable linear, packed with np.packbits, layer by layer and within a layer by linear name) and
    ``mask_bits`` (per layer, the number of mask bits; per-layer slices of ``masks`` start at byte offsets
    ``mask_offsets``); with "experts": ``expert_frequency`` and ``expert_share`` ((layers, experts) float32, see
    moe.ExpertStats); with "hidden": ``hidden_sq`` ((layers, hidden) float64 Σ h² over the tokens after each
    window's first, of every layer's output) and ``hidden_tokens``.
    """
    import torch

    from converter.load import load_model
    from converter.prune.layerwise import LayerWalk
    from converter.prune.masks import unstructured_mask
    from converter.prune.moe import ExpertStats, balanced_kmeans
    from converter.prune.wanda import ActivationNorms, wanda_scores
    from converter.recipe import ModelSpec

    bad = set(task.want) - set(WANTS)
    if bad:
        raise ValueError(f"unknown measurements {sorted(bad)}")
    torch.set_num_threads(task.threads)
    device = task.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    key = tuple(sorted(task.model.items()))
    if key not in _LOADED:  # a worker process keeps its model for its next task (the walk changes no weight)
        _LOADED.clear()
        _LOADED[key] = load_model(ModelSpec(**task.model))
    loaded = _LOADED[key]
    arch = loaded.arch
    layers = arch.decoder_layers()
    windows = torch.from_numpy(np.ascontiguousarray(task.windows, dtype=np.int64))
    walk = LayerWalk(loaded.model, layers, windows, task.batch_size, device)
    res: dict[str, Any] = {
        "name": task.name, "meta": task.meta, "tokens": int(windows.numel()), "device": device, "pid": os.getpid()
    }
    packed: list[np.ndarray] = []
    mask_bits: list[int] = []
    offsets: list[int] = []
    freq: list[np.ndarray] = []
    share: list[np.ndarray] = []
    hidden_sq: list[np.ndarray] = []
    hidden_tokens = 0
    with torch.no_grad():
        for i, layer in walk:
            handles = []
            norms: dict[str, ActivationNorms] = {}
            linears = arch.prunable_linears(layer)
            if "masks" in task.want:
                for name, lin in linears.items():
                    acc = norms[name] = ActivationNorms(lin.in_features, device=device)
                    handles.append(lin.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add_batch(a[0])))
            stats = None
            if "experts" in task.want:
                _gate, up, down = arch.ffn(layer)
                if up.out_features % task.experts:
                    raise DataError(
                        f"--experts {task.experts} does not divide the FFN width {up.out_features} of layer {i}; "
                        "choose a divisor of it."
                    )
                # the same assignment prune's structured FFN pruning computes for this layer (seed = index)
                labels = balanced_kmeans(up.weight.detach().cpu(), task.experts, seed=i)
                stats = ExpertStats(labels, task.experts)
                handles.append(down.register_forward_pre_hook(lambda _m, a, s=stats: s.add(task.name, a[0])))
            try:
                outs = walk.advance()
            finally:
                for h in handles:
                    h.remove()
            if norms:
                offsets.append(sum(p.size for p in packed))
                bits = 0
                for name in sorted(linears):
                    w = linears[name].weight.detach()
                    keep = unstructured_mask(wanda_scores(w, norms[name].sq_sum), task.sparsity)
                    packed.append(np.packbits(keep.cpu().numpy().ravel()))
                    bits += keep.numel()
                mask_bits.append(bits)
            if stats is not None:
                freq.append(stats.frequency(task.name).numpy().astype(np.float32))
                share.append(stats.mean_activation(task.name).numpy().astype(np.float32))
            if "hidden" in task.want:
                sq = None
                for out in outs:
                    h = out[:, 1:].double()  # (b, s-1, hidden): the first position is an attention sink
                    part = h.square().sum(dim=(0, 1))
                    sq = part if sq is None else sq + part
                    if i == 0:
                        hidden_tokens += h.shape[0] * h.shape[1]
                hidden_sq.append(sq.numpy())
    if packed:
        res["masks"] = np.concatenate(packed)
        res["mask_bits"] = mask_bits
        res["mask_offsets"] = offsets
    if freq:
        res["expert_frequency"] = np.stack(freq)
        res["expert_share"] = np.stack(share)
    if hidden_sq:
        res["hidden_sq"] = np.stack(hidden_sq)
        res["hidden_tokens"] = hidden_tokens
    res["seconds"] = time.perf_counter() - t0
    return res


def run_tasks(tasks: list[Task], ray_address: str | None = None, workers: int | None = None) -> list[dict[str, Any]]:
    """Results of ``measure`` for every task, in task order. Sets each task's thread count (see module doc)."""
    if not tasks:
        return []
    n = workers or default_workers(len(tasks), tasks[0].meta.get("task_bytes"))
    threads = max(1, cpu_count() // n)
    for t in tasks:
        t.threads = threads
    if ray_address:
        return _run_ray(tasks, ray_address)
    log.info("analyze: %d tasks in %d local process(es), %d thread(s) each", len(tasks), n, threads)
    if n == 1:
        out = []
        for t in tasks:
            out.append(measure(t))
            log.info("analyze: %s done (%.1fs)", t.name, out[-1]["seconds"])
        return out
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(measure, t): k for k, t in enumerate(tasks)}
        for done, fut in enumerate(as_completed(futures), 1):
            k = futures[fut]
            results[k] = fut.result()
            log.info("analyze: %s done (%d/%d, %.1fs)", tasks[k].name, done, len(tasks), results[k]["seconds"])
    return results  # type: ignore[return-value]


def _run_ray(tasks: list[Task], address: str) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ConvertError(
            "--ray needs the 'ray' package; install it with `pip install 'langconvert[ray]'` or `pip install ray`."
        ) from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    remote = ray.remote(measure)
    refs = [remote.options(num_cpus=t.threads, num_gpus=1 if gpus else 0).remote(t) for t in tasks]
    log.info("analyze: %d tasks on Ray at %s (%s GPU(s) in the cluster)", len(tasks), address, int(gpus))
    results = ray.get(refs)
    for t, r in zip(tasks, results):
        log.info("analyze: %s done on Ray (%s, %.1fs)", t.name, r["device"], r["seconds"])
    return results
