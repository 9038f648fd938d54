"""validate(): named checks, each with its number, threshold and ✓/✗; every check runs before any gate decides.

Checks
- tokenizer parity: held-out text of every target language tokenizes to the same tokens after the id remap,
  and every language's held-out text round-trips (decode(encode(s)) equals what the original tokenizer gives);
- chat template (when the tokenizer has one): conversations render to the same text and the same ids;
- quality: bits per byte and perplexity on held-out text per language, original vs converted vs shipped ONNX;
- ONNX parity: float export vs the converted PyTorch model (max |Δlogit|, top-1 agreement, greedy tokens with
  KV cache), and top-1 agreement of the shipped (possibly int8) artifact;
- size: parameters (total and non-zero) and bytes on disk, before and after;
- speed: decode tokens/s and time to first token, original in PyTorch vs the artifact in onnxruntime;
- downstream tasks (``validate.lm_eval``): lm-evaluation-harness scores of the converted PyTorch model against
  the original's (``lm_eval_hook``), one check per task.
"""

from __future__ import annotations

import gc
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converter.calibrate import CalibrationResult
from converter.lm_eval_hook import LmEvalSuite
from converter.load import LoadedModel
from converter.manifest import return_memory
from converter.recipe import ValidateConfig
from converter.reference import ReferenceResult, speed_prompts

log = logging.getLogger(__name__)

SPEED_NOTE = (
    "Unstructured and N:M zeros are stored densely: PyTorch and onnxruntime's dense kernels do the same work "
    "for them, so pruning alone does not make decoding faster; the speed difference comes from the runtime, "
    "quantized weights and the smaller lm_head of the trimmed vocabulary."
)


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float | None = None
    op: str = ""  # ">=" or "<=" or "==" when gated
    passed: bool | None = None  # None: informational
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "op": self.op,
            "passed": self.passed,
            "detail": self.detail,
        }


def gate(name: str, value: float, op: str, threshold: float, detail: str = "") -> Check:
    if op == ">=":
        ok = value >= threshold
    elif op == "<=":
        ok = value <= threshold
    else:
        ok = value == threshold
    if isinstance(value, float) and math.isnan(value):
        ok = False
    return Check(name, value, threshold, op, ok, detail)


@dataclass
class ValidateResult:
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def summary(self) -> dict[str, Any]:
        gated = [c for c in self.checks if c.passed is not None]
        return {
            "headline": f"{len(gated) - len(self.failed)}/{len(gated)} gates passed"
            + (f"; failed: {', '.join(c.name for c in self.failed)}" if self.failed else ""),
            "checks": [c.as_dict() for c in self.checks],
            **self.metrics,
        }


# ---------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_parity(
    original: Any, trimmed: Any, token_map: list[int] | None, docs: list[str]
) -> dict[str, Any]:
    """Share of documents whose trimmed ids, mapped back through token_map, equal the original ids."""
    if not docs:
        return {"docs": 0, "identical": 0, "share": float("nan"), "first_mismatch": None}
    old = original(docs, add_special_tokens=True)["input_ids"]
    new = trimmed(docs, add_special_tokens=True)["input_ids"]
    same = 0
    first = None
    for i, (a, b) in enumerate(zip(old, new)):
        mapped = [token_map[t] for t in b] if token_map is not None else b
        if mapped == a:
            same += 1
        elif first is None:
            first = docs[i][:80]
    return {"docs": len(docs), "identical": same, "share": same / len(docs), "first_mismatch": first}


def round_trip(original: Any, trimmed: Any, docs: list[str]) -> dict[str, Any]:
    """decode(encode(s)) with the trimmed tokenizer equals the original tokenizer's, for every document."""
    ok = 0
    for d in docs:
        a = original.decode(original(d, add_special_tokens=False)["input_ids"])
        b = trimmed.decode(trimmed(d, add_special_tokens=False)["input_ids"])
        ok += a == b
    return {"docs": len(docs), "identical": ok, "share": ok / len(docs) if docs else float("nan")}


def chat_template_parity(
    original: Any, trimmed: Any, token_map: list[int] | None, docs: list[str]
) -> dict[str, Any] | None:
    """Conversations built from held-out target text, rendered by both tokenizers' chat templates (with and
    without the generation prompt): the text must be equal and the trimmed ids must map back to the original
    ids. Only documents that tokenize identically on their own are used, so the check isolates the template
    (document parity is reported separately). None when the original tokenizer has no chat template."""
    if not getattr(original, "chat_template", None):
        return None

    def same_alone(doc: str) -> bool:
        ids_b = trimmed(doc, add_special_tokens=False)["input_ids"]
        mapped = [token_map[i] for i in ids_b] if token_map is not None else ids_b
        return mapped == original(doc, add_special_tokens=False)["input_ids"]

    texts = [d for d in docs if d.strip() and same_alone(d)][:6] or ["hello"]
    conversations = [
        [{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[(i + 1) % len(texts)]}]
        for i in range(0, min(len(texts), 6), 2)
    ]
    same = total = 0
    first = None
    for conv in conversations:
        for gen in (False, True):
            total += 1
            try:
                a = original.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                b = trimmed.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            except Exception as exc:  # noqa: BLE001 - a template may reject this shape of conversation
                first = first or f"template error: {exc}"
                continue
            ids_a = original(a, add_special_tokens=False)["input_ids"]
            ids_b = trimmed(b, add_special_tokens=False)["input_ids"]
            mapped = [token_map[i] for i in ids_b] if token_map is not None else ids_b
            if a == b and mapped == ids_a:
                same += 1
            elif first is None:
                first = conv[0]["content"][:80]
    return {
        "renders": total,
        "identical": same,
        "share": same / total if total else float("nan"),
        "first_mismatch": first,
    }


def tokens_per_char(tokenizer: Any, docs: list[str], byte_ids: set[int] | None = None) -> dict[str, float]:
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    n_tok = sum(len(x) for x in ids)
    n_chr = sum(len(d) for d in docs)
    out = {"tokens_per_char": n_tok / n_chr if n_chr else float("nan")}
    if byte_ids is not None:
        n_byte = sum(1 for x in ids for t in x if t in byte_ids)
        out["byte_fallback_share"] = n_byte / n_tok if n_tok else float("nan")
    return out


def byte_token_ids(tokenizer: Any) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}


# ---------------------------------------------------------------------------------------------------- quality
# Largest logits tensor one scoring batch may produce, in float32 elements (64 MB): rows x positions x vocab.
LOGIT_BUDGET = 16 * 1024 * 1024
_LSE_CHUNK = 64  # positions per log-sum-exp pass, so the temporary stays a few dozen MB for big vocabularies


def _batches(tokenizer: Any, docs: list[str], max_len: int, vocab_size: int, max_rows: int = 8):
    """Documents as right-padded batches, longest first, each batch's logits within :data:`LOGIT_BUDGET`.

    Sorting by length keeps padding (computed and thrown away) small; the budget keeps a 262k-token vocabulary
    from needing gigabytes of logits: (8, 256, 262144) float32 would be 2.1 GB."""
    enc = [ids[:max_len] for ids in tokenizer(docs, add_special_tokens=True)["input_ids"]]
    enc = sorted((e for e in enc if len(e) >= 2), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    i = 0
    while i < len(enc):
        width = len(enc[i])  # the longest of the batch: the list is sorted
        rows = max(1, min(max_rows, LOGIT_BUDGET // max(1, width * vocab_size)))
        chunk = enc[i : i + rows]
        i += len(chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        yield chunk, ids, mask


def _target_logprob_sum(logits: torch.Tensor, chunk: list[list[int]]) -> float:
    """Sum over the real positions of log p(next token): logit[target] - logsumexp(logits), in position chunks."""
    total = 0.0
    for j, e in enumerate(chunk):
        n = len(e) - 1  # positions 0..n-1 predict tokens 1..n
        target = torch.tensor(e[1:], dtype=torch.long)
        for a in range(0, n, _LSE_CHUNK):
            b = min(n, a + _LSE_CHUNK)
            rows = logits[j, a:b].float()  # (positions, vocab)
            picked = rows.gather(-1, target[a:b, None])[:, 0]
            total += float((picked - torch.logsumexp(rows, dim=-1)).sum())
    return total


def score_texts(
    logits_fn: Any, tokenizer: Any, docs: list[str], max_len: int, vocab_size: int | None = None
) -> dict[str, float]:
    """Bits per UTF-8 byte and perplexity of ``docs`` under a model given as logits_fn(ids, mask) -> logits.

    Bits per byte divides the summed negative log-likelihood (in bits) of every predicted token by the UTF-8
    bytes those tokens spell, so it compares models whose tokenizers differ. ``vocab_size``: the width of the
    logits (default: the tokenizer's length), which sizes the batches.
    """
    nll = 0.0
    n_tok = 0
    n_bytes = 0
    width = vocab_size or len(tokenizer)
    for chunk, ids, mask in _batches(tokenizer, docs, max_len, width):
        logits = torch.as_tensor(logits_fn(ids, mask))  # (batch, seq, vocab)
        nll -= _target_logprob_sum(logits, chunk)
        del logits
        for e in chunk:
            n_tok += len(e) - 1
            n_bytes += len(tokenizer.decode(e[1:], skip_special_tokens=True).encode("utf-8"))
    if n_tok == 0 or n_bytes == 0:
        return {"bpb": float("nan"), "ppl": float("nan"), "tokens": 0, "bytes": 0}
    return {
        "bpb": nll / math.log(2) / n_bytes,
        "ppl": math.exp(nll / n_tok),
        "tokens": n_tok,
        "bytes": n_bytes,
    }


def torch_logits_fn(model: Any):
    @torch.no_grad()
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return fn


def onnx_logits_fn(onnx_dir: Path):
    from converter import ort

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(ort.onnx_logits(onnx_dir, ids, mask))

    return fn


def _rel(value: float, base: float) -> float:
    return value / base - 1 if base else float("nan")


def _long_prompt(tokenizer: Any, docs: list[str], cfg: ValidateConfig) -> list[int] | None:
    """``cfg.long_prompt_tokens`` ids of held-out target text joined (the tokenizer's specials once, at the start);
    None when disabled or when the text is too short."""
    if not cfg.long_prompt_tokens or not docs:
        return None
    ids = list(tokenizer(docs[0], add_special_tokens=True)["input_ids"])
    for doc in docs[1:]:
        if len(ids) >= cfg.long_prompt_tokens:
            break
        ids += tokenizer("\n" + doc, add_special_tokens=False)["input_ids"]
    return ids[: cfg.long_prompt_tokens] if len(ids) >= cfg.long_prompt_tokens else None


# ---------------------------------------------------------------------------------------------------- sizes
def greedy_margins(logits_fn: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """PyTorch's lead of its top-1 logit over the runner-up at each greedy step (one forward over prompt +
    tokens): step i's margin says how close the choice of ``tokens[i]`` was to a tie."""
    if not tokens:
        return []
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    lg = logits_fn(ids, torch.ones_like(ids))[0, len(prompt) - 1 :].float()  # (len(tokens), V)
    top2 = lg.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def greedy_verdict(
    ref: list[int], got: list[int], margins: list[float], tie_margin: float
) -> tuple[bool, str]:
    """Whether ``got`` passes against PyTorch's greedy ``ref``: identical, or first different at a step whose
    PyTorch ``margins`` entry is below ``tie_margin`` (a near-tie). Returns (passed, detail)."""
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    detail = f"first {same}/{len(ref)} tokens equal"
    if got == ref:
        return True, detail
    if same >= min(len(ref), len(got), len(margins)):  # a run cut short is no tie
        return False, detail
    tie = margins[same] < tie_margin
    detail += f"; PyTorch's top-1 led by {margins[same]:.3f} logits there" + (
        f" (a near-tie, < {tie_margin:g})" if tie else ""
    )
    return tie, detail


def top2_lead(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At each position of ``logits`` (S, V): the ids of the top-1 and the runner-up, (S, 2), and the top-1's lead
    over the runner-up in logits, (S,): what lead_moved compares another model against."""
    top2 = logits.topk(2, dim=-1)
    return top2.indices.clone(), (top2.values[:, 0] - top2.values[:, 1]).clone()


def lead_moved(ref_lead: torch.Tensor, ref_top2: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """How far another model's ``logits`` (S, V) move PyTorch's lead at each position: |PyTorch's top-1 logit minus
    its runner-up (``ref_lead``) - the other model's difference between the same two tokens (``ref_top2``, (S, 2))|."""
    other = logits.float().gather(1, ref_top2[:, :1]) - logits.float().gather(1, ref_top2[:, 1:])
    return (ref_lead.float() - other.squeeze(1)).abs()


def lead_moved_stats(moved: torch.Tensor) -> dict[str, float]:
    """Median, 90th and 99th percentile and maximum of ``lead_moved`` over all positions, in logits."""
    q = torch.quantile(moved.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"median": q[0], "p90": q[1], "p99": q[2], "max": float(moved.max()), "positions": int(moved.numel())}


def tie_margin_hint(stats: dict[str, float] | None, tie_margin: float) -> str:
    """For a failed greedy gate: when the artifact moves PyTorch's lead by more than the recipe's near-tie margin
    at a tenth of positions or more, where it departs is decided by rounding; say so and name the setting."""
    if not stats or stats["p90"] <= tie_margin:
        return ""
    return (
        f"; the artifact moves PyTorch's top-1 lead by more than {tie_margin:g} at over a tenth of held-out "
        f"positions (90th percentile {stats['p90']:.3f} logits), so raise validate.greedy_tie_margin to about "
        "that if such departures are rounding, or quantize less"
    )


def param_counts(model: Any) -> dict[str, int]:
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"total": total, "nonzero": nonzero}


def dir_bytes(path: Path | None, pattern: str = "*") -> int:
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------------- driver
def validate(
    reference: ReferenceResult,
    original_tokenizer: Any,
    converted: LoadedModel,
    token_map: list[int] | None,
    calib: CalibrationResult,
    cfg: ValidateConfig,
    model_dir: Path,
    onnx_dir: Path | None = None,
    float_onnx_dir: Path | None = None,
    parity_gated: set[str] | None = None,
    runtime: str | None = None,
    script_check: dict[str, Any] | None = None,
    lm_eval: LmEvalSuite | None = None,
) -> ValidateResult:
    """Check ``converted`` (the saved checkpoint, loaded back) and its ONNX artifact against ``reference`` (the
    original's numbers, measured before any stage changed it) and ``original_tokenizer``.

    ``parity_gated``: target languages whose tokenization the trim guarantees (default: every target).
    ``runtime``: the artifact's runtime ('onnxruntime-genai' or 'onnxruntime'; default: from its files).
    ``script_check``: the trim's exhaustive script check (``vocab.probe.script_check``), gated at no difference.
    ``lm_eval``: the ``lm_eval_hook.LmEvalSuite`` the reference stage scored the original on."""
    res = ValidateResult()
    m = res.metrics
    targets = [d for d in calib.languages.values() if d.keep_vocab]

    # --- tokenizer parity and round trip
    m["tokenizer"] = {}
    byte_old = byte_token_ids(original_tokenizer)
    byte_new = byte_token_ids(converted.tokenizer)
    parity_docs = 0
    parity_same = 0
    for d in calib.languages.values():
        entry: dict[str, Any] = {"target": d.keep_vocab}
        if d.keep_vocab:
            p = tokenizer_parity(original_tokenizer, converted.tokenizer, token_map, d.heldout_docs)
            p["gated"] = parity_gated is None or d.code in parity_gated
            entry["parity"] = p
            if p["gated"]:
                parity_docs += p["docs"]
                parity_same += p["identical"]
        entry["round_trip"] = round_trip(original_tokenizer, converted.tokenizer, d.heldout_docs)
        entry["before"] = tokens_per_char(original_tokenizer, d.heldout_docs, byte_old or None)
        entry["after"] = tokens_per_char(converted.tokenizer, d.heldout_docs, byte_new or None)
        m["tokenizer"][d.code] = entry
    if parity_docs:
        res.checks.append(
            gate(
                "tokenizer parity (held-out target text)",
                parity_same / parity_docs,
                ">=",
                cfg.min_tokenizer_parity,
                f"{parity_same}/{parity_docs} documents identical after the id remap ("
                + ", ".join(d.code for d in targets if parity_gated is None or d.code in parity_gated)
                + ")",
            )
        )
    if script_check is not None:
        m["script_check"] = script_check
        per = ", ".join(f"{name} {v['code_points']:,}" for name, v in script_check["scripts"].items())
        res.checks.append(
            gate(
                "every code point of the kept scripts tokenizes as before",
                1.0 - script_check["differ"] / max(script_check["strings"], 1),
                ">=",
                1.0,
                f"{script_check['strings'] - script_check['differ']:,}/{script_check['strings']:,} strings (code "
                f"points: {per}; each alone, after a space, between its neighbours)",
            )
        )
    chat_docs = [doc for d in targets for doc in d.heldout_docs[:3]]
    chat = chat_template_parity(original_tokenizer, converted.tokenizer, token_map, chat_docs)
    if chat is not None:
        m["chat_template"] = chat
        res.checks.append(
            gate(
                "chat template renders and tokenizes the same",
                chat["share"],
                ">=",
                1.0,
                f"{chat['identical']}/{chat['renders']} conversations of held-out target text",
            )
        )
    rt_docs = sum(e["round_trip"]["docs"] for e in m["tokenizer"].values())
    rt_ok = sum(e["round_trip"]["identical"] for e in m["tokenizer"].values())
    if rt_docs:
        res.checks.append(
            gate(
                "tokenizer round trip (all languages)",
                rt_ok / rt_docs,
                ">=",
                1.0,
                f"{rt_ok}/{rt_docs} documents",
            )
        )

    # --- quality per language. One model at a time: the converted PyTorch model scores every language, runs
    # lm_eval, computes the greedy references and writes its logits for the parity windows to an unlinked scratch
    # file; it is released before the shipped artifact's session opens (pass 1), and that session is closed
    # before the float export's (pass 2). No two models or sessions are ever in memory together.
    m["quality"] = {}
    conv_fn = torch_logits_fn(converted.model)
    rows = converted.model.get_output_embeddings().weight.shape[0]
    pc = param_counts(converted.model)
    for d in calib.languages.values():
        m["quality"][d.code] = {
            "original": reference.quality[d.code],
            "converted": score_texts(
                conv_fn, converted.tokenizer, d.heldout_docs, cfg.eval_seq_len, vocab_size=rows
            ),
        }
    quality_checks_at = len(res.checks)

    # --- downstream tasks, while the converted PyTorch weights are still loaded
    if lm_eval is not None:
        from converter.lm_eval_hook import compare, run_suite

        scores = run_suite(converted.model, converted.tokenizer, lm_eval)
        m["lm_eval"], lm_checks = compare(reference.lm_eval or {}, scores, lm_eval)
        res.checks.extend(lm_checks)

    # --- ONNX parity, PyTorch's side: greedy references and logits of the parity windows (to scratch)
    art_speed = None
    artifact = None
    if onnx_dir is not None:
        from converter import ort
        from converter.runtime import artifact_logits_fn, open_artifact

        docs = [doc for d in targets for doc in d.heldout_docs[:4]]
        ids_list = [
            e[: cfg.eval_seq_len]
            for e in converted.tokenizer(docs, add_special_tokens=True)["input_ids"]
            if len(e) > 1
        ]
        long_ids = _long_prompt(converted.tokenizer, [doc for d in targets for doc in d.heldout_docs], cfg)
        windows = ids_list + ([long_ids] if long_ids else [])
        float_dir = float_onnx_dir or onnx_dir
        quantized = float_dir != onnx_dir
        kind = "quantized artifact" if quantized else "artifact"
        prompts = {}
        if cfg.greedy_tokens and ids_list:
            prompts = {"short": ids_list[0][:16], **({"long": long_ids} if long_ids else {})}
        ref_greedy = {
            label: ort.greedy_generate_torch(converted.model, torch.tensor([p]), cfg.greedy_tokens)
            for label, p in prompts.items()
        }
        ref_margins = {
            label: greedy_margins(conv_fn, p, ref_greedy[label]) for label, p in prompts.items()
        }
        scratch = tempfile.TemporaryFile(dir=model_dir.parent)
        shapes = []
        ref_tops = []
        ref_top2 = []  # PyTorch's top-1 and runner-up at each position, and its lead: (S, 2) ids, (S,) logits
        for e in windows:
            ref = conv_fn(torch.tensor([e]), torch.ones(1, len(e), dtype=torch.long))[0].float().numpy()
            scratch.write(memoryview(np.ascontiguousarray(ref)).cast("B"))  # no bytes copy of the (S, V) array
            shapes.append(ref.shape)
            ref_tops.append(torch.from_numpy(ref).argmax(-1))
            ref_top2.append(top2_lead(torch.from_numpy(ref)))
            del ref  # one (S, V) array at a time
        speed_texts = speed_prompts(converted.tokenizer, calib, cfg) if reference.speed is not None and targets else None
        conv_fn = None
        converted.release_weights()
        # freed heap pages back to the OS and the checkpoint's clean pages unmapped before the next model
        # opens: the artifact and the float export's pass otherwise start ~0.5 GB higher on Gemma 3 270M
        return_memory()
        # pass 1: the shipped artifact, in its own runtime
        artifact = open_artifact(onnx_dir, runtime)

    art_fn = artifact_logits_fn(artifact) if artifact is not None else None
    worst_increase = None
    worst_quant = None
    for d in calib.languages.values():
        q = m["quality"][d.code]
        if art_fn is not None:
            q["artifact"] = score_texts(
                art_fn, converted.tokenizer, d.heldout_docs, cfg.eval_seq_len, vocab_size=rows
            )
            q["artifact_vs_converted"] = _rel(q["artifact"]["bpb"], q["converted"]["bpb"])
        final = q.get("artifact", q["converted"])
        q["bpb_increase"] = _rel(final["bpb"], q["original"]["bpb"])
        if d.keep_vocab and (worst_increase is None or q["bpb_increase"] > worst_increase[1]):
            worst_increase = (d.code, q["bpb_increase"])
        if (
            d.keep_vocab
            and "artifact" in q
            and (worst_quant is None or q["artifact_vs_converted"] > worst_quant[1])
        ):
            worst_quant = (d.code, q["artifact_vs_converted"])
        log.info(
            "quality %s: bpb %.3f -> %.3f (%+.1f%%)",
            d.code,
            q["original"]["bpb"],
            final["bpb"],
            100 * q["bpb_increase"],
        )
    quality_checks = []
    if worst_increase is not None:
        code, inc = worst_increase
        detail = f"worst target language: {code}"
        if cfg.max_bpb_increase is not None:
            quality_checks.append(gate("bits-per-byte increase", inc, "<=", cfg.max_bpb_increase, detail))
        else:
            quality_checks.append(Check("bits-per-byte increase", inc, detail=detail + " (not gated)"))
    if worst_quant is not None:
        code, inc = worst_quant
        name = "bits-per-byte increase of the artifact over converted PyTorch"
        detail = f"worst target language: {code}"
        if cfg.max_artifact_bpb_increase is not None:
            quality_checks.append(gate(name, inc, "<=", cfg.max_artifact_bpb_increase, detail))
        else:
            quality_checks.append(Check(name, inc, detail=detail + " (not gated)"))
    res.checks[quality_checks_at:quality_checks_at] = quality_checks

    if onnx_dir is not None:
        agree_art = [0, 0]
        moved = []
        for e, ref_top, (top2_ids, lead) in zip(windows, ref_tops, ref_top2):
            art_logits = torch.from_numpy(artifact.logits(e))
            agree_art[0] += int((ref_top == art_logits.argmax(-1)).sum())
            agree_art[1] += len(e)
            moved.append(lead_moved(lead, top2_ids, art_logits))
            del art_logits
        moved_stats = lead_moved_stats(torch.cat(moved)) if moved else None
        greedy = {
            label: {"onnx_artifact": artifact.greedy(p, cfg.greedy_tokens)} for label, p in prompts.items()
        }
        if speed_texts is not None:
            art_speed = artifact.decode_speed(speed_texts, cfg.speed_new_tokens)
        runtime_name = artifact.runtime
        artifact = art_fn = None
        return_memory()

        # pass 2: the float export in plain onnxruntime, against PyTorch logit by logit. Its session computes from
        # the mapped data file (no packed copy), so a float export larger than the memory left still checks.
        ort.clear_session_cache()  # the artifact's session, when it ran in plain onnxruntime
        float_session = ort.load_session(float_dir, mapped=True)
        max_diff = 0.0
        agree_float = [0, 0]
        scratch.seek(0)
        for e, shape in zip(windows, shapes):
            fl = torch.as_tensor(ort.onnx_logits(float_session, torch.tensor([e]))).float()[0]
            # PyTorch's logits read back in chunks of positions: no second (S, V) array beside the float export's
            chunk = np.empty((_LSE_CHUNK, shape[1]), np.float32)
            for a in range(0, len(e), _LSE_CHUNK):
                rows = min(_LSE_CHUNK, len(e) - a)
                scratch.readinto(memoryview(chunk[:rows]).cast("B"))
                ref = torch.from_numpy(chunk[:rows])
                max_diff = max(max_diff, float((ref - fl[a : a + rows]).abs().max()))
                agree_float[0] += int((ref.argmax(-1) == fl[a : a + rows].argmax(-1)).sum())
            agree_float[1] += len(e)
            del fl, chunk, ref
        scratch.close()
        for label, p in prompts.items():
            greedy[label]["onnx_float"] = ort.greedy_generate_onnx(
                float_session, torch.tensor([p]), cfg.greedy_tokens
            )
        float_session = None
        ort.clear_session_cache()
        gc.collect()

        top1_float = agree_float[0] / max(1, agree_float[1])
        top1_art = agree_art[0] / max(1, agree_art[1])
        m["onnx"] = {
            "max_abs_logit_diff_float": max_diff,
            "top1_agreement_float": top1_float,
            "top1_agreement_artifact": top1_art,
            "positions": agree_float[1],
            "long_prompt_tokens": len(long_ids) if long_ids else 0,
            "quantized": quantized,
            "runtime": runtime_name,
            "artifact_lead_moved": {k: round(v, 4) for k, v in moved_stats.items()} if moved_stats else None,
        }
        n_windows = f"{len(ids_list)} held-out windows" + (
            f" + one of {len(long_ids)} tokens" if long_ids else ""
        )
        res.checks.append(
            gate(
                "ONNX float vs PyTorch max |Δlogit|",
                max_diff,
                "<=",
                cfg.onnx_max_abs_logit_diff,
                f"{n_windows}, {agree_float[1]} positions",
            )
        )
        res.checks.append(
            gate(
                "ONNX artifact vs PyTorch top-1 agreement",
                top1_art,
                ">=",
                cfg.onnx_min_top1_agreement,
                f"{kind} in {runtime_name}, {n_windows}",
            )
        )
        if moved_stats:
            res.checks.append(
                Check(
                    "artifact's change of PyTorch's top-1 lead, 90th percentile (logits)",
                    moved_stats["p90"],
                    detail=f"median {moved_stats['median']:.3f}, 99th percentile {moved_stats['p99']:.3f}, max "
                    f"{moved_stats['max']:.3f} over {moved_stats['positions']} positions; the greedy gates' "
                    f"near-tie margin is {cfg.greedy_tie_margin:g}",
                )
            )
        if prompts:
            m["onnx"]["greedy"] = {}
            for label, prompt in prompts.items():
                ref_tokens = ref_greedy[label]
                runs = {
                    "onnx_float": greedy[label]["onnx_float"],
                    "onnx_artifact": greedy[label]["onnx_artifact"],
                }
                margins = ref_margins[label]
                m["onnx"]["greedy"][label] = {
                    "prompt_tokens": len(prompt),
                    "torch": ref_tokens,
                    **runs,
                    "torch_top2_margins": [round(x, 4) for x in margins],
                }
                ties = " up to near-ties" if cfg.greedy_tie_margin > 0 else ""
                for which, toks in runs.items():
                    passed, detail = greedy_verdict(ref_tokens, toks, margins, cfg.greedy_tie_margin)
                    hint = ""
                    if not passed and which == "onnx_artifact":
                        hint = tie_margin_hint(moved_stats, cfg.greedy_tie_margin)
                    what = "ONNX float" if which == "onnx_float" else f"{kind} ({runtime_name})"
                    res.checks.append(
                        gate(
                            f"{what} greedy tokens with KV cache identical{ties}, {label} prompt",
                            float(passed),
                            "==",
                            1.0,
                            f"{detail} after a {len(prompt)}-token prompt{hint}",
                        )
                    )
        if cfg.long_prompt_tokens and not long_ids:
            res.checks.append(
                Check(
                    "long-prompt checks",
                    None,
                    detail=f"skipped: the held-out target text has fewer than {cfg.long_prompt_tokens} tokens",
                )
            )

    # --- sizes
    before = dict(reference.size)
    after = {
        "parameters": pc["total"],
        "nonzero_parameters": pc["nonzero"],
        "vocab_size": len(converted.tokenizer),
        "checkpoint_bytes": dir_bytes(model_dir, "*.safetensors"),
        "onnx_bytes": dir_bytes(onnx_dir, "*.onnx*") if onnx_dir is not None else None,
    }
    m["size"] = {"before": before, "after": after}
    res.checks.append(
        Check(
            "parameters after / before",
            after["parameters"] / before["parameters"],
            detail=f"{before['parameters']:,} -> {after['parameters']:,}",
        )
    )

    # --- speed (the original timed by the reference stage, the artifact in pass 1 above, on the same prompts)
    if reference.speed is not None and targets:
        speed = {"original_torch": reference.speed}
        if art_speed is not None:
            speed["artifact_onnx"] = art_speed
            speed["ratio_tokens_per_s"] = art_speed["tokens_per_s"] / reference.speed["tokens_per_s"]
            res.checks.append(
                Check(
                    "decode tokens/s artifact / original",
                    speed["ratio_tokens_per_s"],
                    detail=f"{reference.speed['tokens_per_s']:.1f} -> {art_speed['tokens_per_s']:.1f} tok/s",
                )
            )
        speed["note"] = SPEED_NOTE
        m["speed"] = speed
    return res
