"""Vocabulary trimming speed and resulting sizes on real tokenizers (ko+en), with in-run baselines.

For each tokenizer: the time to select + rebuild the trimmed tokenizer.json and to load it, against the time
to load the original tokenizer (baseline, same run); the time to gather the kept embedding rows of a real-size
float32 matrix, against a plain copy of that matrix (baseline, same run). Prints a markdown section; --write
appends it to benchmarks/RESULTS.md.

    python benchmarks/bench_vocab.py [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from converter.calibrate import read_documents, split_heldout  # noqa: E402
from converter.languages import language_scripts  # noqa: E402
from converter.recipe import VocabConfig  # noqa: E402
from converter.validate import tokenizer_parity  # noqa: E402
from converter.vocab import trim_tokenizer_json  # noqa: E402

# tokenizer folder -> hidden size of a model it ships with (Gemma 3 270M, Qwen2.5-0.5B, Llama 3.2 1B, GPT-2,
# Llama 2 7B, multilingual-e5-small, bge-small; Mistral 7B for the raw SentencePiece .model).
CASES = {
    "gemma3": 640,
    "qwen2.5": 896,
    "llama3": 2048,
    "gpt2": 768,
    "llama2": 4096,
    "xlm-roberta": 384,
    "bert-wordpiece": 384,
}
SPM_CASES = {"mistral-sentencepiece": 4096}


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _embedding_times(vocab: int, hidden: int, token_map: list[int]) -> tuple[float, float]:
    emb = torch.randn(vocab, hidden)  # (vocab, hidden), the size of the model's embedding
    idx = torch.tensor(token_map)
    t_copy, _ = best_of(lambda: emb.clone())
    t_gather, _ = best_of(lambda: emb.index_select(0, idx))
    return t_copy, t_gather


def measure(name: str, hidden: int, split: dict) -> tuple:
    from transformers import PreTrainedTokenizerFast

    tdir = SHARED / "tokenizers" / name
    t_load, tok = best_of(lambda: AutoTokenizer.from_pretrained(tdir))
    counts = [
        Counter(t for ids in tok(split[c][0], add_special_tokens=False)["input_ids"] for t in ids) for c in ("ko", "en")
    ]
    tj = json.loads(tok.backend_tokenizer.to_str())
    # Every Hangul token plus the corpus tokens of both languages.
    cfg = VocabConfig(min_count=1, keep_scripts=True)
    t_trim, (new_tj, token_map, sel) = best_of(lambda: trim_tokenizer_json(tj, counts, language_scripts("ko"), cfg))
    t_new_load, _ = best_of(lambda: Tokenizer.from_str(json.dumps(new_tj)))
    t_copy, t_gather = _embedding_times(len(tok), hidden, token_map)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(new_tj)))
    par = tokenizer_parity(tok, trimmed, token_map, split["ko"][1])
    family = tj["model"]["type"]
    return (name, family, len(tok), len(token_map), hidden, t_load, t_trim, t_new_load, t_copy, t_gather,
            par["identical"], par["docs"])  # fmt: skip


def measure_spm(name: str, hidden: int, split: dict, scratch: Path) -> tuple:
    from converter.vocab.spm import SentencePieceTokenizer, trim_model_file

    src = SHARED / "tokenizers" / name / "tokenizer.model"
    t_load, tok = best_of(lambda: SentencePieceTokenizer(src))
    counts = [
        Counter(t for ids in tok(split[c][0], add_special_tokens=False)["input_ids"] for t in ids) for c in ("ko", "en")
    ]
    cfg = VocabConfig(min_count=1, keep_scripts=True)
    out = scratch / "tokenizer.model"
    t_trim, (token_map, _sel) = best_of(lambda: trim_model_file(src, counts, language_scripts("ko"), cfg, out))
    t_new_load, trimmed = best_of(lambda: SentencePieceTokenizer(out))
    t_copy, t_gather = _embedding_times(len(tok), hidden, token_map)
    par = tokenizer_parity(tok, trimmed, token_map, split["ko"][1])
    return (name, "SentencePiece .model (BPE)", len(tok), len(token_map), hidden, t_load, t_trim, t_new_load,
            t_copy, t_gather, par["identical"], par["docs"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = ap.parse_args()

    ntrex = SHARED / "corpora" / "ntrex128"
    texts = {"ko": read_documents(ntrex / "newstest2019-ref.kor.txt"), "en": read_documents(ntrex / "newstest2019-ref.eng-US.txt")}
    split = {k: split_heldout(v, 0.1) for k, v in texts.items()}
    import tempfile

    rows = [measure(name, hidden, split) for name, hidden in CASES.items()]
    with tempfile.TemporaryDirectory() as scratch:
        rows += [measure_spm(name, hidden, split, Path(scratch)) for name, hidden in SPM_CASES.items()]

    lines = [
        f"## Vocabulary trimming (ko + en) — {date.today().isoformat()}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
        "Script: `python benchmarks/bench_vocab.py`; best of 3 for every timing. Counts from the first 90% of the NTREX "
        "Korean and English lines; policy: every Hangul token plus the Korean and English corpus tokens (recipes/korean.yaml also keeps Han and counts Korean law text, hence its larger vocabulary). The parity column counts held-out Korean lines tokenized identically; the others quote Latin-script words the English corpus never used. BERT's uncased normalizer decomposes Hangul syllables into jamo, so that vocabulary keeps its jamo and few syllables; the XLM-R and BERT rows include finding the pieces the tokenizer can never emit. select+rebuild of the `.model` includes deriving its merges from piece scores and writing the file.",
        "",
        "| tokenizer | model | vocab before | after | kept | select+rebuild s | load trimmed s | × load original | "
        "embedding gather s (rows × hidden) | × plain copy | held-out ko parity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, family, before, after, hidden, t_load, t_trim, t_new, t_copy, t_gather, same, docs in rows:
        lines.append(
            f"| {name} | {family} | {before:,} | {after:,} | {after / before:.1%} | {t_trim:.2f} | {t_new:.2f} | "
            f"{(t_trim + t_new) / t_load:.2f}× (original loads in {t_load:.2f} s) | {t_gather:.3f} ({before:,} × {hidden}) | "
            f"{t_gather / t_copy:.2f}× | {same}/{docs} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        path = ROOT / "benchmarks" / "RESULTS.md"
        if not path.exists():
            path.write_text("# Benchmark results\n\nEvery number below was measured by the script named in its section.\n\n")
        with path.open("a", encoding="utf-8") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
