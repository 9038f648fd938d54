"""Rebuild a tokenizer.json (and tokenizer_config.json) for a set of kept ids.

New ids are contiguous and follow the old-id order, so ``token_map`` (new id -> old id) is strictly increasing.
Only the vocabulary, the merges, the unk id, the added tokens and the ids the post-processor names change; the
normalizer, pre-tokenizer, decoder and model options (byte_fallback, ignore_merges, unk_token, ...) are copied
unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from converter.errors import ModelError


def _remap_id(old_to_new: Mapping[int, int], old: int, what: str) -> int:
    try:
        return old_to_new[old]
    except KeyError:
        raise ModelError(f"{what} uses token id {old}, which the trimmed vocabulary does not keep") from None


def _remap_post_processor(node: Any, old_to_new: Mapping[int, int]) -> None:
    """Rewrite token ids inside a post-processor (TemplateProcessing, Bert/Roberta processing, Sequence)."""
    if isinstance(node, list):
        for n in node:
            _remap_post_processor(n, old_to_new)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        # "special_tokens": {name: {"id": name, "ids": [old ids], "tokens": [strings]}}
        for spec in (node.get("special_tokens") or {}).values():
            spec["ids"] = [_remap_id(old_to_new, i, "post_processor special token") for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if key in node:  # [token, id]
                tok, i = node[key]
                node[key] = [tok, _remap_id(old_to_new, i, f"post_processor {key}")]
    elif kind == "Sequence":
        _remap_post_processor(node.get("processors"), old_to_new)


def rebuild_tokenizer_json(tj: Mapping[str, Any], kept: Sequence[int]) -> tuple[dict[str, Any], list[int]]:
    """New tokenizer.json dict for the kept old ids, and token_map (new id -> old id).

    Families: BPE (vocab dict and merges), Unigram (vocab list of [piece, score], unk_id) and WordPiece (vocab
    dict). BPE merges are kept iff their result is kept (``select.merge_closure`` guarantees both parts are kept then), in
    their original order and format ("a b" strings or [a, b] pairs).
    """
    token_map = sorted(set(kept))
    old_to_new = {old: new for new, old in enumerate(token_map)}
    new = {k: v for k, v in tj.items() if k != "model"}
    new = copy.deepcopy(new)
    model = {k: v for k, v in tj["model"].items() if k not in ("vocab", "merges")}
    model = copy.deepcopy(model)

    mtype = tj["model"].get("type") or "BPE"
    if mtype == "Unigram":
        # vocab is a list of [piece, score]; the id is the position.
        model["vocab"] = [list(p) for i, p in enumerate(tj["model"]["vocab"]) if i in old_to_new]
        if model.get("unk_id") is not None:
            model["unk_id"] = _remap_id(old_to_new, int(model["unk_id"]), "the Unigram unk_id")
    else:
        old_vocab: Mapping[str, int] = tj["model"]["vocab"]
        new_vocab = {tok: old_to_new[i] for tok, i in old_vocab.items() if i in old_to_new}
        # Keep the vocab listed in id order, like the tokenizers library writes it.
        model["vocab"] = dict(sorted(new_vocab.items(), key=lambda kv: kv[1]))
        # unk_token is a string: it stays valid as long as the token is kept, which selection guarantees.
        unk = model.get("unk_token")
        if unk is not None and unk in old_vocab and unk not in new_vocab:
            raise ModelError(f"the unknown token {unk!r} was not kept")
    if mtype == "BPE":
        prefix = tj["model"].get("continuing_subword_prefix") or ""
        merges_out: list[Any] = []
        for m in tj["model"].get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            result = a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)
            if result in new_vocab:
                if a not in new_vocab or b not in new_vocab:
                    raise ModelError(
                        f"merge {a!r} + {b!r} -> {result!r} is kept but one of its parts is not; the kept ids are "
                        "not closed under merges (use select.merge_closure)"
                    )
                merges_out.append(m)
        model["merges"] = merges_out

    added = []
    for a in new.get("added_tokens") or []:
        if a["id"] not in old_to_new and a.get("special"):
            continue  # a special placeholder the selection dropped on purpose (vocab.drop_reserved)
        a = dict(a)
        a["id"] = _remap_id(old_to_new, a["id"], f"added token {a['content']!r}")
        added.append(a)
    new["added_tokens"] = added
    _remap_post_processor(new.get("post_processor"), old_to_new)

    # Put "model" back where it was so the file reads like the original.
    ordered: dict[str, Any] = {}
    for k in tj:
        ordered[k] = model if k == "model" else new[k]
    return ordered, token_map


def rebuild_tokenizer_config(config: Mapping[str, Any], token_map: Sequence[int]) -> dict[str, Any]:
    """tokenizer_config.json with ``added_tokens_decoder`` keys (old ids as strings) renumbered."""
    out = dict(config)
    dec = config.get("added_tokens_decoder")
    if dec:
        old_to_new = {old: new for new, old in enumerate(token_map)}
        out["added_tokens_decoder"] = {
            str(_remap_id(old_to_new, int(k), f"tokenizer_config added token {v.get('content')!r}")): v
            for k, v in sorted(dec.items(), key=lambda kv: int(kv[0]))
            if int(k) in old_to_new or not v.get("special")  # special placeholders may be dropped
        }
    return out
