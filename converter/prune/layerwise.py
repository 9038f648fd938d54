"""prune(): walk the decoder layers one at a time, score every linear, zero the weights in place.

Sequential layer-wise pruning as in Wanda (Sun et al. 2023, arXiv:2306.11695) and SparseGPT (Frantar & Alistarh
2023): the inputs of layer 0 are captured once for every calibration window; then for each layer i

1. (wanda) hooks on the layer's linears accumulate Σ_t x_tj² while the *dense* layer i runs on every batch;
2. masks are built from the scores (per output row, or N:M) and the weights are zeroed in place;
3. the now-pruned layer i runs again on every batch, and its outputs become the inputs of layer i+1,

so every layer is calibrated on what the already-pruned layers before it produce. Only one layer boundary of
activations, (num_samples, seq_len, hidden), lives in memory (on CPU), plus one layer on ``device``.

The keyword arguments a layer receives (attention masks, rotary position embeddings, ...) come from the model's
own forward: pre-hooks on *every* layer record them, because they differ between layers (Gemma 3 passes a
sliding-window mask to sliding layers and a causal one to full-attention layers). They depend only on the batch
shape, so they are recorded once per distinct batch size, with a forward that stops before the last layer runs.

Magnitude pruning needs no activations at all, so it runs no forward. Embeddings and the lm_head are never touched.

Structured FFN pruning (``method: experts``) walks the same way: while the dense layer i runs, hooks gather the
FFN's per-language expert statistics (moe.py) and the Gram matrix of the down-projection's inputs; then the
chosen neurons are removed from gate/up/down, down is refit (structured.py), and the shrunken layer produces the
next layer's inputs. Every layer keeps the same width, so ``intermediate_size`` in the config stays one number.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from converter.calibrate import TEXT, TRANSLATION, CalibrationResult
from converter.errors import DataError, ModelError, RecipeError
from converter.load import LoadedModel, unmap_clean_checkpoint_pages
from converter.prune import structured
from converter.prune.masks import measured_sparsity, nm_mask, unstructured_mask
from converter.prune.moe import ExpertStats, balanced_kmeans
from converter.prune.shared import SharedInputs, float32_products
from converter.prune.sparsegpt import HessianAccumulator, inverse_hessian_factor, sparsegpt
from converter.prune.wanda import ActivationNorms, contrast_norms, magnitude_scores, wanda_scores
from converter.recipe import PruneConfig

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    method: str
    sparsity: float  # target fraction of zeros per pruned linear
    pattern: str  # 'unstructured' or 'N:M'
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> linear name -> measured
    skipped_layers: list[int] = field(default_factory=list)  # left dense on purpose
    num_linears: int = 0  # linears pruned
    pruned_linear_params: int = 0  # weights in the pruned linears
    zeroed_params: int = 0  # zeros among them after pruning
    seconds: float = 0.0
    device: str = "cpu"
    ffn: dict[str, Any] = field(default_factory=dict)  # method experts: widths, selection, per-layer refit

    @property
    def overall_sparsity(self) -> float:
        return self.zeroed_params / self.pruned_linear_params if self.pruned_linear_params else 0.0

    @property
    def headline(self) -> str:
        if self.method == "none":
            return "no pruning (prune.method none): all weights kept"
        if self.method == "experts":
            f = self.ffn
            return (
                f"experts ({f.get('selection')}): FFN width {f.get('width_before')} -> {f.get('width_after')} in "
                f"{len(f.get('layers', {}))} layers, {f.get('params_removed', 0):,} parameters removed"
            )
        return (
            f"{self.method} {self.sparsity:.0%} {self.pattern}: measured {self.overall_sparsity:.1%} "
            f"over {self.num_linears} linears"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "method": self.method,
            "target_sparsity": self.sparsity,
            "pattern": self.pattern,
            "measured_sparsity": round(self.overall_sparsity, 6),
            "num_linears": self.num_linears,
            "pruned_linear_params": self.pruned_linear_params,
            "zeroed_params": self.zeroed_params,
            "skipped_layers": list(self.skipped_layers),
            "per_layer": {
                str(i): {name: round(s, 6) for name, s in linears.items()}
                for i, linears in self.per_layer.items()
            },
            "seconds": round(self.seconds, 3),
            "device": self.device,
            **({"ffn": self.ffn} if self.ffn else {}),
        }


class _StopForward(Exception):
    """Raised from a pre-hook to end a capture forward early."""


@dataclass
class _LayerCall:
    """How the model called one layer for one batch shape: positional args after hidden_states, and kwargs."""

    args: tuple
    kwargs: dict[str, Any]


def _to(obj: Any, device: str | torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, _LayerCall]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    # no KV cache while calibrating: every window is one full forward
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    for key in ("past_key_values", "past_key_value"):
        if key in kwargs:
            kwargs[key] = None
    return hidden, _LayerCall(rest, kwargs)


def _capture(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int, compute=contextlib.nullcontext
) -> tuple[list[torch.Tensor], dict[int, list[_LayerCall]]]:
    """Layer-0 inputs for every batch (CPU), and each layer's call arguments per distinct batch size. ``compute``:
    the context the walk's layers run in (_autocast), for the one real layer call here."""
    n_layers = len(layers)
    model_device = next(model.parameters()).device
    states: list[torch.Tensor] = []
    calls_by_size: dict[int, list[_LayerCall]] = {}
    with compute():  # before any recording hook
        extra = _output_extras(model, layers, windows[:1, :1].to(model_device))
    for ids in windows.split(batch_size):
        bsz = ids.shape[0]
        need_calls = bsz not in calls_by_size
        calls: list[_LayerCall | None] = [None] * n_layers

        def hook(idx: int, calls: list[_LayerCall | None] = calls, need_calls: bool = need_calls):
            def _pre(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                hidden, call = _split_hidden(args, kwargs)
                if idx == 0:
                    states.append(hidden.detach().to("cpu", copy=True))
                calls[idx] = call
                if not need_calls or idx == n_layers - 1:
                    raise _StopForward

            return _pre

        hooked = range(n_layers) if need_calls else range(1)
        handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in hooked]
        ids = ids.to(model_device)
        before = len(states)
        try:
            if not need_calls:
                _forward_until_stopped(model, ids)
            elif not _forward_with_idle_layers(model, layers, ids, extra):
                # the model's own code between layers needed real outputs: record again with real layers
                del states[before:]
                calls[:] = [None] * n_layers
                _forward_until_stopped(model, ids)
        finally:
            for h in handles:
                h.remove()
        if calls[0] is None:
            raise ModelError(
                "the model's forward never reached decoder layer 0; prune cannot walk this model."
            )
        if need_calls:
            missing = [i for i, c in enumerate(calls) if c is None]
            if missing:
                raise ModelError(
                    f"the model's forward never called decoder layers {missing}; prune cannot walk this model."
                )
            calls_by_size[bsz] = calls  # type: ignore[assignment]
    return states, calls_by_size


def _forward_until_stopped(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass


def _forward_with_idle_layers(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, extra: int | None) -> bool:
    """The model's forward with every decoder layer's computation replaced by returning its input: the
    pre-hooks still record each layer's call arguments (masks and rotary tables come from the model's forward
    before the layer loop, not from the layers' outputs), and the batch costs no layer work. ``extra``: how the
    real layers return (_output_extras); an idle layer returns the same way. False if the forward failed that
    way; the caller then records with the real layers."""

    if extra is None:
        return False

    def idle(hidden_states=None, *args: Any, **kwargs: Any) -> Any:
        return hidden_states if extra < 0 else (hidden_states,) + (None,) * extra

    for layer in layers:
        layer.forward = idle
    try:
        _forward_until_stopped(model, ids)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: this family needs real layer outputs
        log.debug("prune: capture with idle layers failed (%s); capturing with the real layers", exc)
        return False
    finally:
        for layer in layers:
            del layer.forward


def _output_extras(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> int | None:
    """How a decoder layer returns its hidden states, so that an idle layer returns them the same way: -1 for the
    bare tensor (transformers 5), n >= 0 for a tuple with n more entries after it (transformers 4's
    ``(hidden_states,)``). Found by running real layer 0 on ``ids`` (one token is enough); None if that fails."""
    form: list[int] = []

    def record(_mod: nn.Module, _args: tuple, out: Any) -> None:
        form.append(len(out) - 1 if isinstance(out, (tuple, list)) else -1)
        raise _StopForward

    handle = layers[0].register_forward_hook(record)
    try:
        _forward_until_stopped(model, ids)
    except Exception as exc:  # noqa: BLE001 - the caller then records with the real layers
        log.debug("prune: probing the layers' output form failed (%s)", exc)
    finally:
        handle.remove()
    return form[0] if form else None


class _ByKind:
    """Σ x² of one input, split by window kind (calibration.translation.contrast): ``split(x, text, mt)``."""

    def __init__(self, text: ActivationNorms, mt: ActivationNorms, split) -> None:
        self.text, self.mt, self._split = text, mt, split

    def add_batch(self, x: torch.Tensor) -> None:
        self._split(x, self.text, self.mt)


def _autocast(device: str | torch.device, compute_dtype: str):
    """The context the calibration passes run in: torch.autocast to bfloat16 for prune.compute_dtype bfloat16
    (matrix products in bfloat16, reductions and norms as autocast keeps them), nothing otherwise."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, compute_dtype))


def _cpu_has_bf16_units() -> bool:
    """Does this CPU multiply bfloat16 matrices in hardware (AMX tiles or AVX512-BF16)? False when unknown."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _run_layer(
    layer: nn.Module,
    states: list[torch.Tensor],
    calls: dict[int, _LayerCall],
    device: str,
    before_batch=None,
    compute_dtype: str = "float32",
) -> list[torch.Tensor]:
    """Run one layer on every batch; outputs (batch, seq, hidden) come back to CPU in the dtype of the states.
    ``before_batch(i)`` is called before batch i runs (hooks use it to know which windows they see)."""
    outs = []
    with _autocast(device, compute_dtype):
        for bi, h in enumerate(states):
            if before_batch is not None:
                before_batch(bi)
            call = calls[h.shape[0]]
            out = layer(h.to(device), *call.args, **call.kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.to("cpu", h.dtype))
    return outs


def _normalise_skips(skip: list[int], n_layers: int) -> list[int]:
    out = set()
    for i in skip:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise RecipeError(
                f"prune.skip_layers contains {i}, but the model has {n_layers} decoder layers "
                f"(indices 0..{n_layers - 1}, or negative from the end); fix the list."
            )
        out.add(j)
    return sorted(out)


def _check_nm(layers: nn.ModuleList, linears_of, to_prune: list[int], pattern: str, m: int) -> None:
    bad = [
        f"layer {i} {name} (in_features {lin.in_features})"
        for i in to_prune
        for name, lin in linears_of(layers[i]).items()
        if lin.in_features % m
    ]
    if bad:
        raise ModelError(
            f"prune.pattern '{pattern}' needs every pruned linear's in_features divisible by {m}, but "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} is not; use pattern 'unstructured' or list "
            f"those layers in prune.skip_layers."
        )


def _mask(score: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    nm = cfg.nm
    return nm_mask(score, *nm) if nm else unstructured_mask(score, cfg.sparsity)


@torch.no_grad()
def prune(
    loaded: LoadedModel, calib: CalibrationResult, cfg: PruneConfig, device: str = "cpu"
) -> PruneResult:
    """Prune every prunable linear of every decoder layer not in ``cfg.skip_layers``, in place."""
    t0 = time.perf_counter()
    result = PruneResult(method=cfg.method, sparsity=cfg.sparsity, pattern=cfg.pattern, device=str(device))
    if cfg.method == "none":
        log.info("prune: method none, all weights kept")
        return result

    arch = loaded.arch
    model = loaded.model
    layers = arch.decoder_layers()
    n_layers = len(layers)
    skips = _normalise_skips(cfg.skip_layers, n_layers)
    result.skipped_layers = skips
    to_prune = [i for i in range(n_layers) if i not in skips]
    nm = cfg.nm
    if nm:
        _check_nm(layers, arch.prunable_linears, to_prune, cfg.pattern, nm[1])

    wanda = cfg.method in ("wanda", "sparsegpt", "experts")  # these need calibration activations
    states: list[torch.Tensor] = []
    calls_cpu: dict[int, list[_LayerCall]] = {}
    if wanda:
        windows = calib.windows
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise DataError(
                "prune.method wanda needs calibration windows, but calibration produced none; add calibration "
                "text or use prune.method magnitude."
            )
        log.info(
            "prune: capturing layer-0 inputs for %d windows of %d tokens", windows.shape[0], windows.shape[1]
        )
        if cfg.compute_dtype == "bfloat16" and torch.device(device).type == "cpu" and not _cpu_has_bf16_units():
            log.warning(
                "prune: compute_dtype bfloat16 on a CPU without bfloat16 matrix units (AMX or AVX512-BF16) runs "
                "the calibration passes slower than float32; set prune.compute_dtype: float32 on this machine"
            )
        states, calls_cpu = _capture(
            model, layers, windows.long(), cfg.batch_size, lambda: _autocast(device, cfg.compute_dtype)
        )
    # wanda: run layers only up to the last one that is pruned; nothing after it needs activations
    last_needed = max(to_prune) if (wanda and to_prune) else -1

    for i in tqdm(range(n_layers), desc="prune", unit="layer", disable=None):
        t_layer = time.perf_counter()
        layer = layers[i]
        pruned = i in to_prune
        if not pruned and i > last_needed:
            log.info("prune: layer %d/%d left dense (prune.skip_layers)", i, n_layers - 1)
            continue
        home = next(layer.parameters()).device
        layer.to(device)
        calls = {
            b: _LayerCall(_to(c[i].args, device), _to(c[i].kwargs, device)) for b, c in calls_cpu.items()
        }
        linears = arch.prunable_linears(layer)

        dense_out: list[torch.Tensor] | None = None  # the layer's outputs before pruning, where a pass made them
        if pruned and cfg.method == "experts":
            dense_out = _prune_ffn(arch, layer, i, states, calls, device, calib, cfg, result)
        elif pruned and cfg.method == "sparsegpt":
            hess = SharedInputs(
                lambda name, lins=linears: HessianAccumulator(lins[name].in_features, device, cfg.compute_dtype)
            )
            handles = [
                lin.register_forward_pre_hook(lambda _m, args, name=name, hess=hess: hess.add(name, args[0]))
                for name, lin in linears.items()
            ]
            try:
                dense_out = _run_layer(
                    layer, states, calls, device, lambda _bi, hess=hess: hess.new_batch(), cfg.compute_dtype
                )
            finally:
                for h in handles:
                    h.remove()
            hess.new_batch()  # drop the last batch's inputs
            stats = {}
            factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one factorisation per shared Hessian
            for name, lin in linears.items():
                w = lin.weight.data  # (out_features, in_features)
                acc = hess.of[name]
                if id(acc) not in factors:
                    factors[id(acc)] = inverse_hessian_factor(acc.symmetric(), cfg.sparsegpt_damp)
                new, _keep = sparsegpt(
                    w, acc.symmetric(), cfg.sparsity, cfg.nm, cfg.sparsegpt_blocksize, cfg.sparsegpt_damp,
                    factor=factors[id(acc)],
                )
                # a new tensor, not a write into the old one: the checkpoint's mapped pages stay clean, so
                # unmap_clean_checkpoint_pages can give them back (and no copy-on-write page faults)
                lin.weight.data = w = new
                stats[name] = measured_sparsity(w)
                result.pruned_linear_params += w.numel()
                result.zeroed_params += int((w == 0).sum())
            result.per_layer[i] = stats
            result.num_linears += len(linears)
        elif pruned:
            norms: dict[str, ActivationNorms] = {}
            # calibration.translation.contrast (Kim et al. 2024): a second accumulator per linear takes the
            # translation windows' tokens, ``norms`` the text windows' ones; see wanda.contrast_norms
            mt_norms: dict[str, ActivationNorms] = {}
            kinds = calib.kinds if wanda and calib.contrast and cfg.method == "wanda" else []
            contrast = TEXT in kinds and TRANSLATION in kinds
            if kinds and not contrast and i == to_prune[0]:
                log.warning("prune: contrast needs text and translation windows, got only %s; plain Wanda", kinds[0])
            if wanda:
                is_mt = torch.tensor([k == TRANSLATION for k in kinds], dtype=torch.bool)  # (num_windows,)
                batch = {"first": 0}  # index of the first window of the batch running now

                def by_kind(x, text, mt, is_mt=is_mt, batch=batch, layer_idx=i) -> None:
                    """x: (batch, seq, in) inputs of one linear; each window's rows go to its kind's norms."""
                    rows = is_mt[batch["first"] : batch["first"] + x.shape[0]].to(x.device)  # (batch,)
                    if rows.shape[0] != x.shape[0]:
                        raise ModelError(
                            f"prune: a linear of layer {layer_idx} sees inputs {tuple(x.shape)} without a leading batch "
                            "dimension, so translation and text windows cannot be told apart; set "
                            "calibration.translation.contrast: false."
                        )
                    if rows.any():
                        mt.add_batch(x[rows])
                    if not rows.all():
                        text.add_batch(x[~rows])

                def make(name: str, lins=linears, split=by_kind, contrast=contrast) -> ActivationNorms | _ByKind:
                    width = lins[name].in_features
                    if contrast:
                        return _ByKind(ActivationNorms(width, device), ActivationNorms(width, device), split)
                    return ActivationNorms(width, device=device)

                shared = SharedInputs(make)  # q/k/v (and gate/up) read one tensor: one Σ x² for them

                def before(bi: int, batch=batch, shared=shared) -> None:
                    batch["first"] = bi * cfg.batch_size
                    shared.new_batch()

                handles = [
                    lin.register_forward_pre_hook(lambda _m, args, name=name, shared=shared: shared.add(name, args[0]))
                    for name, lin in linears.items()
                ]
                try:
                    dense_out = _run_layer(layer, states, calls, device, before, cfg.compute_dtype)
                finally:
                    for h in handles:
                        h.remove()
                    shared.new_batch()
                for name, acc in shared.of.items():
                    if contrast:
                        norms[name], mt_norms[name] = acc.text, acc.mt
                    else:
                        norms[name] = acc
            stats: dict[str, float] = {}
            for name, lin in linears.items():
                w = lin.weight.data  # (out_features, in_features)
                acc = norms.get(name)
                mt = mt_norms.get(name)
                if mt is not None and acc is not None and mt.tokens and acc.tokens:
                    # s_j = s_mt·s_mt/s_text in place of ‖X_j‖₂ (wanda_scores takes the square), (in,)
                    score = wanda_scores(w, contrast_norms(mt.sq_sum, mt.tokens, acc.sq_sum, acc.tokens).square())
                else:
                    sq, tokens = (acc.sq_sum, acc.tokens) if acc is not None else (None, 0)
                    if mt is not None and acc is not None:  # one kind saw no tokens: Wanda over all of them
                        sq, tokens = acc.sq_sum + mt.sq_sum, acc.tokens + mt.tokens  # (shared: not in place)
                    if acc is not None and tokens == 0:
                        log.warning(
                            "prune: layer %d %s saw no calibration tokens; using magnitude scores", i, name
                        )
                        sq = None
                    score = wanda_scores(w, sq) if sq is not None else magnitude_scores(w)
                lin.weight.data = w = w.masked_fill(~_mask(score, cfg), 0)  # a new tensor, as SparseGPT's
                stats[name] = measured_sparsity(w)
                result.pruned_linear_params += w.numel()
                result.zeroed_params += int((w == 0).sum())
            result.per_layer[i] = stats
            result.num_linears += len(linears)

        # propagate: the pruned layer's outputs are the next layer's inputs (prune.propagate: dense keeps the
        # outputs of the statistics pass, the original model's, and saves this second pass)
        if wanda and i < last_needed:
            if cfg.propagate == "dense" and dense_out is not None:
                states = dense_out
            else:
                dense_out = None  # before the second pass: two copies of the activations at a time, not three
                states = _run_layer(layer, states, calls, device, compute_dtype=cfg.compute_dtype)
        dense_out = None
        layer.to(home)
        unmap_clean_checkpoint_pages()  # this layer's original weights: read, replaced or kept, not needed now
        if pruned and cfg.method == "experts":
            log.info(
                "prune: layer %d/%d FFN %d -> %d neurons, reconstruction error %.3g -> %.3g (%.2fs)",
                i,
                n_layers - 1,
                result.ffn["width_before"],
                result.ffn["width_after"],
                result.ffn["layers"][str(i)]["error_removed"],
                result.ffn["layers"][str(i)]["error_refit"],
                time.perf_counter() - t_layer,
            )
        elif pruned:
            mean = sum(result.per_layer[i].values()) / max(len(result.per_layer[i]), 1)
            log.info(
                "prune: layer %d/%d %s, %d linears, mean measured sparsity %.1f%% (%.2fs)",
                i,
                n_layers - 1,
                cfg.method,
                len(linears),
                100 * mean,
                time.perf_counter() - t_layer,
            )
        else:
            log.info("prune: layer %d/%d left dense (prune.skip_layers)", i, n_layers - 1)

    if cfg.method == "experts" and result.ffn:
        arch.set_ffn_width(result.ffn["width_after"])
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - t0
    log.info("prune: %s in %.1fs", result.headline, result.seconds)
    return result


def _prune_ffn(
    arch,
    layer: nn.Module,
    index: int,
    states: list[torch.Tensor],
    calls: dict[int, _LayerCall],
    device: str,
    calib: CalibrationResult,
    cfg: PruneConfig,
    result: PruneResult,
) -> list[torch.Tensor]:
    """Structured FFN pruning of one layer, in place (see the module doc and structured.py). Returns the layer's
    outputs before pruning (from the statistics pass)."""
    gate, up, down = arch.ffn(layer)
    width = up.out_features
    if width % cfg.experts:
        raise ModelError(
            f"prune.experts {cfg.experts} does not divide the FFN width {width} of layer {index}; choose a divisor "
            f"of {width} (e.g. {next(e for e in (64, 32, 16, 8, 4, 2, 1) if width % e == 0)})."
        )
    labels = balanced_kmeans(up.weight.data.detach().cpu(), cfg.experts, seed=index)
    stats = ExpertStats(labels, cfg.experts)
    gram = torch.zeros(width, width, dtype=torch.float64)
    x_sq = torch.zeros(up.in_features, dtype=torch.float64)
    langs = calib.window_langs
    batch = {"i": 0}

    def on_down(_m, args):
        # (b, s, I): the down-projection's inputs (OPT's layer flattens them to (b·s, I) before its FFN)
        a = args[0].detach().reshape(states[batch["i"]].shape[0], -1, width)
        flat = a.reshape(-1, width).float()
        with float32_products(flat.device.type, cfg.compute_dtype):  # float32 XᵀX under autocast too
            gram.add_((flat.T @ flat).double().cpu())
        first = batch["i"] * cfg.batch_size
        for j in range(a.shape[0]):
            stats.add(langs[first + j] if first + j < len(langs) else "?", a[j])

    def on_up(_m, args):
        x_sq.add_(args[0].detach().float().pow(2).reshape(-1, up.in_features).sum(0).double().cpu())

    handles = [down.register_forward_pre_hook(on_down), up.register_forward_pre_hook(on_up)]
    try:
        dense_out = _run_layer(
            layer, states, calls, device, lambda bi: batch.__setitem__("i", bi), cfg.compute_dtype
        )
    finally:
        for h in handles:
            h.remove()

    tokens = sum(stats.tokens.values())
    if cfg.refit and index == 0 and tokens < 4 * width:
        log.warning(
            "prune: the refit sees %d calibration tokens for FFNs %d wide; with fewer than 4x the width the least "
            "squares overfit the calibration text: raise calibration.num_samples or seq_len",
            tokens,
            width,
        )
    n_remove = round(cfg.sparsity * cfg.experts)
    n_keep = width - n_remove * (width // cfg.experts)
    if n_keep <= 0:
        raise RecipeError(f"prune.sparsity {cfg.sparsity:g} would remove every FFN neuron; lower it.")
    groups = sorted(stats.tokens)
    pooled = sum(stats.act[g] for g in groups) / max(sum(stats.tokens.values()), 1)
    if cfg.expert_selection == "activation":
        keep = structured.keep_from_experts(pooled, labels, n_remove)
    elif cfg.expert_selection == "reconstruction":
        keep = structured.obs_remove(down.weight.data.detach().cpu(), gram, labels, n_remove)
    elif cfg.expert_selection == "random":
        g = torch.Generator().manual_seed(1000 + index)
        keep = structured.keep_from_experts(torch.rand(cfg.experts, generator=g), labels, n_remove)
    else:
        scores = structured.wanda_sp_scores(
            gate.weight.data.cpu() if gate is not None else None,
            up.weight.data.cpu(),
            down.weight.data.cpu(),
            x_sq,
            gram.diagonal(),
        )
        keep = structured.keep_from_neurons(scores, n_keep)
    w_down = down.weight.data.detach().cpu()
    plain = w_down[:, keep]
    err_removed = structured.reconstruction_error(w_down, gram, keep, plain)
    refit = cfg.refit and len(keep) < width  # nothing removed: nothing to compensate, weights stay as they are
    new_down = structured.refit_down(w_down, gram, keep) if refit else plain.clone()
    err_refit = structured.reconstruction_error(w_down, gram, keep, new_down) if refit else err_removed
    total = structured.reconstruction_error(w_down, gram, torch.arange(0), torch.zeros(w_down.shape[0], 0))
    dev = down.weight.device
    arch.replace_ffn(
        layer,
        structured.shrink_linear(gate, keep, 0) if gate is not None else None,
        structured.shrink_linear(up, keep, 0),
        structured.shrink_linear(down, keep, 1, weight=new_down.to(dev)),
    )
    removed_params = (width - len(keep)) * (up.in_features * (3 if gate is not None else 2))
    ffn = result.ffn or {
        "selection": cfg.expert_selection,
        "experts": cfg.experts,
        "width_before": width,
        "width_after": len(keep),
        "refit": cfg.refit,
        "params_removed": 0,
        "layers": {},
    }
    ffn["params_removed"] += removed_params
    ffn["layers"][str(index)] = {
        "kept": len(keep),
        # Σ‖A W^T − A_K W'^T‖² relative to Σ‖A W^T‖² (the layer's FFN output energy on calibration tokens)
        "error_removed": err_removed / max(total, 1e-30),
        "error_refit": err_refit / max(total, 1e-30),
        "expert_share": {g: [round(float(v), 5) for v in stats.mean_activation(g)] for g in groups},
        "expert_frequency": {g: [round(float(v), 4) for v in stats.frequency(g)] for g in groups},
    }
    result.ffn = ffn
    result.per_layer[index] = {"ffn_width_removed": 1 - len(keep) / width}
    result.num_linears += 3 if gate is not None else 2
    result.pruned_linear_params += width * up.in_features * (3 if gate is not None else 2)
    result.zeroed_params += removed_params
    return dense_out


class LayerWalk:
    """The layer-by-layer walk of ``prune`` as a reusable iterator, for stages that read (or rewrite) one decoder
    layer at a time on the calibration windows: GPTQ and ``langconvert analyze``.

    Iterating yields ``(index, layer)`` with the layer on ``device``. Inside the loop body, ``run()`` runs the
    current layer on every batch (hooks the caller registered fire) and returns its outputs without moving the
    walk on; ``advance()`` runs it and makes the outputs the next layer's inputs. When the body did not call
    ``advance()``, the walk does after it (except after the last layer, whose outputs nothing reads), with the
    layer's weights as the body left them. ``states`` (list of (batch, seq, hidden) CPU tensors) are the current
    layer's inputs.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int, device: str):
        self.layers = layers
        self.device = device
        self.batch_size = batch_size
        self.states, self._calls_cpu = _capture(model, layers, windows.long(), batch_size)
        self._calls: dict[int, _LayerCall] = {}
        self._advanced = False
        self.index = -1

    def __iter__(self):
        for i, layer in enumerate(self.layers):
            home = next(layer.parameters()).device
            layer.to(self.device)
            self.index = i
            self._calls = {
                b: _LayerCall(_to(c[i].args, self.device), _to(c[i].kwargs, self.device))
                for b, c in self._calls_cpu.items()
            }
            self._advanced = False
            yield i, layer
            if not self._advanced and i < len(self.layers) - 1:
                self.advance()
            layer.to(home)

    def run(self, before_batch=None) -> list[torch.Tensor]:
        """The current layer's outputs on every batch; ``before_batch(i)`` is called before batch i."""
        return _run_layer(self.layers[self.index], self.states, self._calls, self.device, before_batch)

    def advance(self, before_batch=None) -> list[torch.Tensor]:
        """Run the current layer and make its outputs the next layer's inputs; returns them."""
        self.states = self.run(before_batch)
        self._advanced = True
        return self.states
