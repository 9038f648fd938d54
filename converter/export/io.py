"""File handling shared by the export formats: staging directories, saving ONNX, side files, short errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
# protobuf cannot serialise a ModelProto over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
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


def save(model: Any, path: Path, data_name: str = ONNX_DATA_NAME, external: bool | None = None) -> None:
    """Save next to any existing files; external data once the weights near 2 GiB (or when asked)."""
    import onnx

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_THRESHOLD
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
