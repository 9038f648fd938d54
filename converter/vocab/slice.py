"""Gather the embedding and lm_head rows of the kept tokens and renumber the token ids the config names.

``token_map[new_id] = old_id`` (strictly increasing). Rows the map does not name disappear, padding rows
(models whose embedding has more rows than the tokenizer has tokens) included. The module classes stay as they
are (Gemma 3's scaled embedding keeps its scale); only their weights and sizes change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from converter.arch import Arch
from converter.errors import ModelError

_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


@dataclass
class SliceStats:
    rows_before: int  # embedding rows, padding included
    rows_after: int
    tied: bool
    embedding_params_before: int  # embedding + (untied) lm_head parameters
    embedding_params_after: int


def config_token_ids(model: Any) -> set[int]:
    """Every token id the model config and generation config name (bos/eos/pad/...; ints or lists)."""
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in _ID_FIELDS:
            v = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
    return ids


def _remapped_config_ids(cfg: Any, old_to_new: dict[int, int], where: str) -> dict[str, Any]:
    """New values of the token-id fields of one config; raises before anything is modified."""
    out: dict[str, Any] = {}
    if cfg is None:
        return out
    for name in _ID_FIELDS:
        v = getattr(cfg, name, None)
        if v is None:
            continue
        try:
            if isinstance(v, int):
                out[name] = old_to_new[v]
            elif isinstance(v, (list, tuple)):
                out[name] = type(v)(old_to_new[int(x)] for x in v)
        except KeyError as exc:
            raise ModelError(
                f"{where}.{name} = {v} names token id {exc.args[0]}, which the trimmed vocabulary does not keep; "
                "keep it (it should be a special token) or fix the config"
            ) from None
    return out


def _param_count(arch: Arch) -> int:
    emb = arch.input_embeddings().weight
    head = arch.lm_head()
    n = emb.numel()
    if not arch.is_tied():
        n += head.weight.numel()
    if getattr(head, "bias", None) is not None:
        n += head.bias.numel()
    return n


def gather_rows(
    w: torch.Tensor, idx: torch.Tensor, release: Callable[[], Any] | None = None, chunk_bytes: int = 32 << 20
) -> torch.Tensor:
    """``w.index_select(0, idx)`` for increasing ``idx``, read ``chunk_bytes`` of source rows at a time, calling
    ``release`` after each chunk.

    A weight still mapped from a checkpoint file becomes resident page by page as rows are read, and the kernel
    maps the neighbouring cached pages along with each one, so one index_select over a 262k-row embedding makes
    nearly all of it resident next to the kept copy. ``release`` (e.g. giving the clean checkpoint pages back)
    keeps that to one chunk. The result is the same either way.
    """
    if release is None or w.device.type != "cpu" or len(idx) == 0:
        return w.index_select(0, idx)
    out = torch.empty((len(idx), *w.shape[1:]), dtype=w.dtype)
    row_bytes = max(1, w[0].numel() * w.element_size())
    step = max(1, chunk_bytes // row_bytes)
    bounds = torch.searchsorted(idx, torch.arange(0, w.shape[0] + step, step, dtype=idx.dtype))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b > a:
            torch.index_select(w, 0, idx[a:b], out=out[a:b])
            release()
    return out


@torch.no_grad()
def slice_model(
    model: nn.Module, arch: Arch, token_map: Sequence[int], release: Callable[[], Any] | None = None
) -> SliceStats:
    """Keep the embedding / lm_head rows ``token_map`` names, in that order, and renumber config token ids.

    Modifies ``model`` in place. Tied heads stay tied (the head gets the sliced embedding Parameter).
    ``release``: called while the rows are gathered (see gather_rows).
    """
    emb = arch.input_embeddings()
    head = arch.lm_head()
    tied = arch.is_tied()
    rows_before = emb.weight.shape[0]
    params_before = _param_count(arch)
    if len(token_map) == 0:
        raise ModelError("the trimmed vocabulary is empty")
    if max(token_map) >= rows_before or min(token_map) < 0:
        raise ModelError(
            f"the tokenizer has token id {max(token_map)} but the model's embedding has only {rows_before} rows; "
            "the tokenizer does not belong to this model"
        )
    if list(token_map) != sorted(set(token_map)):
        raise ModelError("token_map must be strictly increasing (new ids follow the old-id order)")
    old_to_new = {old: new for new, old in enumerate(token_map)}
    gen_cfg = getattr(model, "generation_config", None)
    # Check every id first so a failure leaves the model untouched.
    config_ids = _remapped_config_ids(model.config, old_to_new, "config")
    gen_ids = _remapped_config_ids(gen_cfg, old_to_new, "generation_config")
    idx = torch.as_tensor(list(token_map), dtype=torch.long, device=emb.weight.device)

    # (rows_before, hidden) -> (len(token_map), hidden)
    old_w = emb.weight
    # gather_rows allocates the new rows (no clone: a second copy would double the transient peak)
    emb.weight = nn.Parameter(gather_rows(old_w, idx, release), requires_grad=old_w.requires_grad)
    del old_w
    emb.num_embeddings = len(token_map)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = old_to_new.get(int(emb.padding_idx))

    if tied:
        head.weight = emb.weight
    else:
        hw = head.weight  # (rows_before, hidden)
        head.weight = nn.Parameter(
            gather_rows(hw, idx.to(hw.device), release), requires_grad=hw.requires_grad
        )
    if getattr(head, "bias", None) is not None:
        b = head.bias  # (rows_before,)
        head.bias = nn.Parameter(b.index_select(0, idx.to(b.device)), requires_grad=b.requires_grad)
    if hasattr(head, "out_features"):
        head.out_features = len(token_map)

    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "vocab_size"):
            cfg.vocab_size = len(token_map)
    for name, v in config_ids.items():
        setattr(model.config, name, v)
    for name, v in gen_ids.items():
        setattr(gen_cfg, name, v)

    return SliceStats(
        rows_before=rows_before,
        rows_after=len(token_map),
        tied=tied,
        embedding_params_before=params_before,
        embedding_params_after=_param_count(arch),
    )
