"""The `langconvert` command.

    langconvert RECIPE [--set key=value ...]     run the recipe (same as `langconvert run RECIPE`)
    langconvert check RECIPE [--set ...]         validate the recipe and its inputs without loading weights
    langconvert schema                           print the recipe's JSON schema
    langconvert vocab TOKENIZER_DIR --languages ko,en --corpus FILE --out DIR
                                                 trim a tokenizer alone (no model)

Exit codes: 0 ok, 1 a validation gate failed, 2 bad recipe or input, 3 runtime failure, 130 interrupted.
User errors print one sentence, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from converter.errors import EXIT_RUNTIME, ConvertError

if TYPE_CHECKING:
    from converter.recipe import VocabConfig

log = logging.getLogger("converter")


class _OwnLines(logging.Filter):
    """Without -v, only langconvert's own lines and third-party errors reach the log: a user cannot act on the
    libraries' advice, deprecation notes and progress chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "converter" or record.name.startswith("converter.") or record.levelno >= logging.ERROR


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("converter").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    third_party = ("transformers", "optimum", "torch", "onnxruntime", "onnxscript", "urllib3", "lm-eval", "lm_eval")
    if verbose == 0:
        handler.addFilter(_OwnLines())
        for noisy in third_party:
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # Python warnings (tracing, deprecations) and progress bars from the dependencies: -v shows them.
        warnings.filterwarnings("ignore")
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    else:
        for noisy in third_party:
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _DefaultRun(click.Group):
    """`langconvert RECIPE` means `langconvert run RECIPE`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if not a.startswith("-")), None)
        if first is not None and first not in self.commands and not any(a in ("--help", "-h") for a in args[:1]):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _fail(exc: BaseException, debug: bool) -> None:
    if isinstance(exc, ConvertError):
        click.echo(f"error: {exc}", err=True)
        if debug:
            import traceback

            traceback.print_exception(exc)
        sys.exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        click.echo("interrupted; no release was written (partial output, if any, is kept as <name>.failed).", err=True)
        sys.exit(130)
    if debug:
        raise exc
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    click.echo(
        f"error: unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback).", err=True
    )
    sys.exit(EXIT_RUNTIME)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="langconvert")
def main() -> None:
    """Convert a multilingual causal LM into a slim, validated single-language ONNX release."""


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe value, e.g. --set prune.sparsity=0.6 (validated like the file).",
)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the final summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option(
    "--resume",
    is_flag=True,
    help="Take over the newest killed or failed run of this release and reuse every stage it finished whose "
    "inputs are unchanged.",
)
def run(recipe: Path, overrides: tuple[str, ...], verbose: int, quiet: bool, debug: bool, resume: bool) -> None:
    """Run RECIPE and write the release directory."""
    _setup_logging(verbose, quiet)
    try:
        from converter.errors import GateFailed
        from converter.pipeline import run_recipe
        from converter.recipe import load_recipe

        rec = load_recipe(recipe, list(overrides))
        preflight(rec)
        try:
            out = run_recipe(rec, resume=resume)
        except GateFailed:
            _print_summary(rec.out_dir.with_name(rec.out_dir.name + ".failed"))
            raise
        _print_summary(out)
        click.echo(f"release written to {out}")
    except BaseException as exc:  # noqa: BLE001 — every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, debug)


def preflight(rec) -> str | None:
    """Every check that needs no weights: sources exist and are readable, the model family is supported and can
    take the recipe's prune method and export format, the output directory may be written. Returns the model_type
    (None where it is known only once loaded: a Hub id, a GGUF file)."""
    from converter.arch import spec_for
    from converter.calibrate import read_documents
    from converter.errors import DataError
    from converter.load import read_model_type, resolve_source
    from converter.manifest import prepare_output

    for lang in rec.languages:
        where = f"languages[{lang.code}]"
        files = rec.resolve_sources(lang.sources, f"{where}.sources")
        if not any(read_documents(f) for f in files):
            raise DataError(
                f"{where}.sources ({', '.join(str(f) for f in files)}) contain no text; "
                "give files with at least one non-empty line."
            )
        rec.resolve_sources(lang.heldout, f"{where}.heldout")
    if rec.calibration.translation is not None:
        from converter.calibrate import read_parallel

        read_parallel(rec.calibration.translation, rec.calibration.heldout_fraction, rec.resolve_sources)
    resolve_source(rec.model.source, rec.base_dir)
    model_type = read_model_type(rec.model, rec.base_dir)
    if model_type is not None:
        _check_family(rec, spec_for(model_type))
    if rec.export.enabled and rec.export.format == "genai":
        from converter.export.genai import check_config, resolve_context_length
        from converter.load import read_model_config

        config = read_model_config(rec.model, rec.base_dir)
        if config is not None:
            check_config(config, resolve_context_length(config, rec.export.context_length))
    if rec.model.tokenizer:
        tok = rec.resolve(rec.model.tokenizer)
        if not (tok / "tokenizer.json").is_file():
            from converter.errors import ModelError

            raise ModelError(f"model.tokenizer '{tok}' has no tokenizer.json; point it at a tokenizer directory.")
    if rec.validate_cfg.lm_eval is not None:
        from converter.lm_eval_hook import preflight_lm_eval

        preflight_lm_eval(rec)  # lm-eval installed, task paths and document-aligned sources exist
    prepare_output(rec)
    return model_type


def _check_family(rec, spec) -> None:
    """One sentence naming what works when the model's family cannot take the recipe's export format or its
    structured FFN pruning."""
    from converter.arch import unstructured_methods
    from converter.errors import ModelError

    problem = spec.format_problem(rec.export.format) if rec.export.enabled else None
    if problem:
        raise ModelError(problem)
    why = spec.ffn_fixed_problem() if rec.prune.method == "experts" else None
    if why:
        raise ModelError(f"prune.method 'experts' cannot shrink this model: {why}; use {unstructured_methods()}.")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def check(recipe: Path, overrides: tuple[str, ...], debug: bool) -> None:
    """Validate RECIPE and its inputs without loading any weights."""
    _setup_logging(0, True)
    try:
        from converter.recipe import load_recipe

        rec = load_recipe(recipe, list(overrides))
        model_type = preflight(rec)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, debug)
    family = f"{model_type} model" if model_type else "model family checked when loaded"
    export = f"export.format {rec.export.format}" if rec.export.enabled else "no export"
    click.echo(
        f"{recipe}: ok ({rec.name}: {', '.join(lang.code for lang in rec.languages)}; {family}, {export}; "
        f"output {rec.out_dir})"
    )
    from converter.arch import support_table

    click.echo("supported model types (export formats): " + "; ".join(f"{t} ({f})" for t, f in support_table()))


@main.command()
@click.option("--markdown", is_flag=True, help="Print the reference table used in the README instead.")
def schema(markdown: bool) -> None:
    """Print the recipe's JSON schema (every key with its description)."""
    from converter.recipe import json_schema, reference_markdown

    click.echo(reference_markdown() if markdown else json.dumps(json_schema(), indent=2, ensure_ascii=False))


@main.command()
@click.argument("tokenizer_dir", type=click.Path(path_type=Path))
@click.option("--languages", required=True, help="Comma-separated target language tags, e.g. ko,en.")
@click.option(
    "--corpus",
    "corpora",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Target-language text (.txt lines or .jsonl 'text'); repeatable. The last 10% is held out for parity.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--min-count", default=1, show_default=True, help="Keep tokens seen at least this often.")
@click.option("--coverage", type=float, default=None, help="Keep the most frequent corpus tokens covering this share.")
@click.option("--max-size", type=int, default=None, help="Cap on the trimmed vocabulary size.")
@click.option("--no-scripts", is_flag=True, help="Keep only corpus tokens, not every token of the scripts.")
@click.option("--extra-script", "extra_scripts", multiple=True, help="Extra Unicode script to keep, e.g. Han.")
@click.option(
    "--control-corpus",
    "controls",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Text in a language that is not kept (e.g. another market); reports its tokens per character and "
    "round trip. Repeatable.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def vocab(
    tokenizer_dir: Path,
    languages: str,
    corpora: tuple[Path, ...],
    out_dir: Path,
    min_count: int,
    coverage: float | None,
    max_size: int | None,
    no_scripts: bool,
    extra_scripts: tuple[str, ...],
    controls: tuple[Path, ...],
    debug: bool,
) -> None:
    """Trim a tokenizer directory alone (no model): writes the trimmed tokenizer, token_map.json, stats.json."""
    _setup_logging(0, True)
    try:
        stats = trim_tokenizer_dir(
            tokenizer_dir,
            languages,
            list(corpora),
            out_dir,
            _vocab_options(
                min_count=min_count,
                coverage=coverage,
                max_size=max_size,
                keep_scripts=not no_scripts,
                extra_scripts=list(extra_scripts),
            ),
            list(controls),
        )
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, debug)
    par = stats["heldout"]["parity"]
    sc = stats["script_check"]
    exhaustive = f"; every code point of {', '.join(sc['scripts'])}: {sc['strings'] - sc['differ']:,}/{sc['strings']:,} " \
        "strings as before" if sc else ""
    click.echo(
        f"vocab {stats['vocab_before']:,} -> {stats['vocab_after']:,}; held-out parity "
        f"{par['identical']}/{par['docs']}{exhaustive}; written to {out_dir}"
    )


def _vocab_options(**options):
    """The vocab command's options as a VocabConfig; a bad value is a RecipeError naming the option."""
    from pydantic import ValidationError

    from converter.errors import RecipeError
    from converter.recipe import VocabConfig

    try:
        return VocabConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "--" + str(err["loc"][0]).replace("_", "-")
        raise RecipeError(f"{name}: {err['msg']}; fix the option value.") from exc


def trim_tokenizer_dir(
    tokenizer_dir: Path,
    languages: str,
    corpora: list[Path],
    out_dir: Path,
    cfg: VocabConfig | None = None,
    controls: list[Path] | None = None,
) -> dict:
    """The `langconvert vocab` command's work, written atomically into ``out_dir``."""
    import shutil
    from collections import Counter

    from converter.calibrate import read_documents, split_heldout
    from converter.errors import DataError, RecipeError
    from converter.languages import language_scripts
    from converter.recipe import LanguageSpec
    from converter.validate import (
        byte_token_ids,
        chat_template_parity,
        round_trip,
        tokenizer_parity,
        tokens_per_char,
    )
    from converter.vocab import trim_tokenizer
    from converter.vocab.spm import SentencePieceTokenizer

    if out_dir.exists():
        raise RecipeError(f"--out '{out_dir}' already exists; remove it or choose another directory.")
    try:
        codes = [LanguageSpec(code=c.strip(), sources=["-"]).code for c in languages.split(",") if c.strip()]
    except Exception as exc:
        raise RecipeError(f"--languages '{languages}' is not a list of language tags; write e.g. ko,en.") from exc
    has_json = (tokenizer_dir / "tokenizer.json").is_file()
    spm_files = sorted(tokenizer_dir.glob("*.model")) if tokenizer_dir.is_dir() else []
    if not has_json and not spm_files:
        raise DataError(
            f"'{tokenizer_dir}' has no tokenizer.json or SentencePiece .model file; point at a tokenizer directory."
        )
    cfg = cfg or VocabConfig()
    calib: list[str] = []
    held: list[str] = []
    for f in corpora:
        if not f.is_file():
            raise DataError(f"--corpus '{f}' does not exist; fix the path.")
        c, h = split_heldout(read_documents(f), 0.1)
        calib += c
        held += h
    if not calib:
        raise DataError("the --corpus files contain no text; give files with at least one non-empty line.")
    control_docs: dict[str, list[str]] = {}
    for f in controls or []:
        if not f.is_file():
            raise DataError(f"--control-corpus '{f}' does not exist; fix the path.")
        control_docs[f.name] = read_documents(f)[:200]

    if has_json:
        from transformers import AutoTokenizer

        from converter.load import load_tokenizer

        original = load_tokenizer(tokenizer_dir)
    else:
        original = SentencePieceTokenizer(spm_files[0])
    counts = Counter(t for ids in original(calib, add_special_tokens=False)["input_ids"] for t in ids)
    scripts = [s for c in codes for s in language_scripts(c)] if cfg.keep_scripts else []
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = trim_tokenizer(tokenizer_dir, counts, scripts, cfg, out_dir=tmp)
        if has_json:
            trimmed = AutoTokenizer.from_pretrained(tmp)
        else:
            trimmed = SentencePieceTokenizer(tmp / spm_files[0].name)
        byte_old, byte_new = byte_token_ids(original) or None, byte_token_ids(trimmed) or None
        stats = {
            "tokenizer_dir": str(tokenizer_dir),
            "languages": codes,
            "scripts": scripts,
            "vocab_before": len(original),
            "vocab_after": len(trimmed),
            "selection": result.stats.summary(),
            "script_check": result.stats.script_check,
            "heldout": {
                "docs": len(held),
                "parity": tokenizer_parity(original, trimmed, result.token_map, held),
                "round_trip": round_trip(original, trimmed, held),
                "before": tokens_per_char(original, held, byte_old),
                "after": tokens_per_char(trimmed, held, byte_new),
            },
            "control": {
                name: {
                    "docs": len(docs),
                    "round_trip": round_trip(original, trimmed, docs),
                    "before": tokens_per_char(original, docs, byte_old),
                    "after": tokens_per_char(trimmed, docs, byte_new),
                }
                for name, docs in control_docs.items()
            },
            "chat_template": chat_template_parity(original, trimmed, result.token_map, held),
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _print_summary(out_dir: Path) -> None:
    path = out_dir / "report.json"
    if not path.is_file():
        return
    rep = json.loads(path.read_text(encoding="utf-8"))
    lines = ["", f"{'stage':<12} {'status':<8} {'seconds':>8}  result"]
    for name, st in rep["stages"].items():
        secs = st.get("seconds")
        lines.append(f"{name:<12} {st['status']:<8} {secs if secs is not None else '':>8}  {st.get('headline') or ''}")
    if rep.get("checks"):
        lines.append("")
        for c in rep["checks"]:
            mark = {True: "✓", False: "✗", None: "·"}[c["passed"]]
            val = c["value"]
            val_s = f"{val:.4g}" if isinstance(val, (int, float)) else str(val)
            gate = f" (gate {c['op']} {c['threshold']:g})" if c.get("op") else ""
            lines.append(f"{mark} {c['name']}: {val_s}{gate}  {c.get('detail', '')}")
    click.echo("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# langconvert analyze


@main.group()
def analyze() -> None:
    """How the model groups languages: geometry from pruning masks, FFN expert maps, translation features."""


def _analysis_options(fn):
    options = [
        click.option("--model", "model", required=True, help="Hub id, checkpoint directory or .gguf file."),
        click.option("--tokenizer", default=None, help="Directory with the tokenizer.json to use instead."),
        click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory to write."),
        click.option("--samples", default=32, show_default=True, type=click.IntRange(1), help="Windows per language."),
        click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8), help="Tokens per window."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the window sampling."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1)),
        click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                     help="Run the per-language tasks on a Ray cluster ('auto', ray://host:10001, or 'local')."),
        click.option("--workers", default=None, type=click.IntRange(1),
                     help="Local processes (default: one per core, as memory allows)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out directory."),
        click.option("-v", "--verbose", count=True, help="More log output (-vv for debug)."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


_corpus_option = click.option(
    "--corpus", "corpora", multiple=True, required=True, metavar="CODE=FILE",
    help="A language and its text (one document per line, or .jsonl); repeat per language.",
)


def _analysis(kind: str, common: dict, inputs, work) -> None:
    """Run one analysis: ``inputs()`` checks the command's own arguments before any weight is loaded, then
    ``work(source, opts, out, inputs())`` runs with the prepared model and the shared options. Failures exit
    like every command: one sentence and a code."""
    _setup_logging(common.pop("verbose"), False)
    debug = common.pop("debug")
    try:
        from converter.analyze import RunOptions, prepare_model

        model, tokenizer, out = common.pop("model"), common.pop("tokenizer"), common.pop("out")
        opts = RunOptions(**common)
        checked = inputs()
        source = prepare_model(model, tokenizer)
        work(source, opts, out, checked)
        click.echo(f"analyze {kind} written to {out}")
    except BaseException as exc:  # noqa: BLE001 — every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, debug)


def _pairs(items, option: str, at_least: int = 1):
    from converter.analyze import parse_pairs
    from converter.errors import DataError

    pairs = parse_pairs(items, option)
    if len(pairs) < at_least:
        raise DataError(f"this analysis needs at least {at_least} {option} CODE=FILE languages, got {len(pairs)}.")
    return pairs


def _print_matrix(title: str, codes: list[str], rows: list[list[float]]) -> None:
    click.echo(title)
    click.echo("       " + " ".join(f"{c:>6}" for c in codes))
    for c, row in zip(codes, rows):
        click.echo(f"{c:>6} " + " ".join(f"{v:6.4f}" for v in row))


@analyze.command()
@_corpus_option
@click.option("--sparsity", default=0.5, show_default=True, type=click.FloatRange(0.01, 0.99),
              help="Share of each row's weights the Wanda keep-masks prune.")
@_analysis_options
def geometry(corpora, sparsity, **common) -> None:
    """Language geometry: per-language Wanda keep-masks, their Hamming distances, MDS and a tree."""

    def work(source, opts, out, pairs):
        from converter.analyze.geometry import analyze_geometry

        data = analyze_geometry(source, pairs, out, sparsity, opts)
        _print_matrix("normalized Hamming distance of keep-masks", data["languages"], data["hamming"])

    _analysis("geometry", common, lambda: _pairs(corpora, "--corpus"), work)


@analyze.command()
@_corpus_option
@click.option("--experts", default=64, show_default=True, type=click.IntRange(2),
              help="Experts per FFN (as prune.experts); must divide the FFN width.")
@_analysis_options
def experts(corpora, experts, **common) -> None:
    """Per-language, per-layer activation frequency of the FFN experts structured pruning works with."""

    def work(source, opts, out, pairs):
        from converter.analyze.experts import analyze_experts

        data = analyze_experts(source, pairs, out, experts, opts)
        click.echo(f"experts in every language's top {data['top']} per layer: {data['shared_per_layer']}")

    _analysis("experts", common, lambda: _pairs(corpora, "--corpus"), work)


@analyze.command()
@click.option("--parallel", "parallel", multiple=True, required=True, metavar="CODE=FILE",
              help="A language's line-aligned parallel file (line i is the same sentence in every file); repeat.")
@click.option("--direction", "directions", multiple=True, metavar="SRC-TGT",
              help="Translation direction, e.g. en-ko; repeat (default: the first --parallel language to and from "
              "each other).")
@click.option("--shots", default=3, show_default=True, type=click.IntRange(0, 64), help="Demonstrations per prompt.")
@click.option("--top", default=16, show_default=True, type=click.IntRange(1), help="Large dimensions compared per layer.")
@_analysis_options
def features(parallel, directions, shots, top, **common) -> None:
    """Large-magnitude hidden dimensions: k-shot translation prompts against monolingual text, per layer."""

    def work(source, opts, out, pairs):
        from converter.analyze.features import analyze_features

        codes = list(pairs)
        dirs = list(directions) or [d for c in codes[1:] for d in (f"{codes[0]}-{c}", f"{c}-{codes[0]}")]
        data = analyze_features(source, pairs, dirs, out, shots, top, opts)
        click.echo(f"share of the top-{top} hidden dimensions that translation prompts and monolingual text share")
        click.echo("layer " + " ".join(f"{d:>8}" for d in data["directions"]))
        for i in range(data["layers"]):
            click.echo(f"{i:>5} " + " ".join(f"{data['overlap'][d][i]:8.2f}" for d in data["directions"]))

    _analysis("features", common, lambda: _pairs(parallel, "--parallel", at_least=2), work)

if __name__ == "__main__":
    main()
