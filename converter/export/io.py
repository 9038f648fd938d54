"""File handling shared by the export formats: staging directories, saving ONNX, side files, short errors."""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
# protobuf cannot serialise a ModelProto over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors of at least ALIGN_MIN_BYTES start at a multiple of ALIGN_BYTES in the external data file, so that
# onnxruntime's CPU provider maps them from the file instead of copying them (the page size on Linux and macOS;
# the padding costs at most 4 KiB per large tensor).
ALIGN_BYTES = 4096
ALIGN_MIN_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".onnx.data")


def onnx_bytes(onnx_dir: Path) -> int:
    """Bytes on disk of the ONNX graph and its external data files (not config/tokenizer files)."""
    return sum(p.stat().st_size for p in Path(onnx_dir).iterdir() if p.is_file() and ".onnx" in p.name)


class staging:
    """Context manager: a temporary sibling of ``final`` renamed onto it on success, removed on failure."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))
        self.tmp.chmod(0o755)  # mkdtemp makes it 0700; the release is meant to be shared
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def copy_side_files(model_dir: Path, out_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Tokenizer and other non-weight files, verbatim; names in ``keep`` already written by the exporter stay."""
    for p in Path(model_dir).iterdir():
        if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.name in keep and (out_dir / p.name).exists():
            continue
        shutil.copyfile(p, out_dir / p.name)


def copy_non_onnx(src_dir: Path, dst_dir: Path) -> None:
    """Every file of ``src_dir`` except the graph and its weights (configs, tokenizer)."""
    for p in Path(src_dir).iterdir():
        if p.is_file() and ".onnx" not in p.name:
            shutil.copyfile(p, dst_dir / p.name)


def short(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters (the traceback goes to DEBUG)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def opset_of(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


# ------------------------------------------------------------------------------------- graphs loaded lazily
# Graph passes load a model with ``load_external_data=False``: weights stay in the data file until a pass reads
# one (:func:`array`), and :func:`save` copies the untouched ones from file to file. A 500 MB float graph then
# costs its largest tensor in memory, not all of them (and protobuf does not hand freed tensors back).
_DATA_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "langconvert_onnx_data_dir", default=None
)


def load_lazy(path: Path) -> Any:
    """The ModelProto of ``path`` with every external tensor left on disk."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


@contextlib.contextmanager
def reading_from(directory: Path) -> Iterator[None]:
    """Within the block, :func:`array` resolves external tensors relative to ``directory``."""
    token = _DATA_DIR.set(Path(directory))
    try:
        yield
    finally:
        _DATA_DIR.reset(token)


def array(tensor: Any) -> Any:
    """``numpy_helper.to_array`` that also reads a tensor still stored externally (without loading it into the
    proto); the directory comes from :func:`reading_from`."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor):
        base = _DATA_DIR.get()
        if base is None:
            raise RuntimeError(f"tensor {tensor.name} is stored externally; read it inside reading_from(dir)")
        return numpy_helper.to_array(tensor, str(base))
    return numpy_helper.to_array(tensor)


def _external_info(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _read_bytes(tensor: Any, base: Path) -> bytes:
    info = _external_info(tensor)
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def save(
    model: Any,
    path: Path,
    data_name: str = ONNX_DATA_NAME,
    external: bool | None = None,
    src_dir: Path | None = None,
) -> None:
    """Save next to any existing files; external data once the weights near 2 GiB (or when asked).

    ``src_dir``: where tensors the model still references externally live (a :func:`load_lazy` model); they are
    copied tensor by tensor into the new data file, which may replace the one they are read from."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    lazy = [t for t in model.graph.initializer if uses_external_data(t)]
    if lazy and src_dir is None:
        raise ValueError("the model references external tensors; pass src_dir to save it")
    size = sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        int(_external_info(t).get("length", 0)) for t in lazy
    )
    if external is None:
        external = size > EXTERNAL_DATA_THRESHOLD
    if not external:
        for t in lazy:  # small enough to live in the graph
            raw = _read_bytes(t, Path(src_dir))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
        path.unlink(missing_ok=True)
        path.with_name(data_name).unlink(missing_ok=True)
        onnx.save_model(model, str(path))
        return
    data_path = path.with_name(data_name)
    partial = data_path.with_name(f".{data_name}.partial")
    offset = 0
    with open(partial, "wb") as out:
        for t in model.graph.initializer:
            if uses_external_data(t):
                raw = _read_bytes(t, Path(src_dir))
            elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                raw = t.raw_data
            else:
                continue  # small tensors and typed fields stay inside the graph
            if len(raw) >= ALIGN_MIN_BYTES and offset % ALIGN_BYTES:
                pad = ALIGN_BYTES - offset % ALIGN_BYTES
                out.write(bytes(pad))
                offset += pad
            out.write(raw)
            t.ClearField("raw_data")
            _set_external(t, data_name, offset, len(raw))
            offset += len(raw)
    path.unlink(missing_ok=True)
    os.replace(partial, data_path)  # after every read: the old file may have been a source
    onnx.save_model(model, str(path))
