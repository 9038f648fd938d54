"""Manifest: the record of one run, written from the first second and finished atomically.

The release is built in a hidden temporary sibling of the final directory. ``finish`` writes checksums, the
report and manifest.json, then renames the temporary directory to ``<dir>/<name>``; a run that fails (a stage
raised, or a gate failed) is renamed to ``<dir>/<name>.failed`` instead, so nothing half-written ever looks
like a release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import shutil
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from converter.errors import ConvertError, RecipeError
from converter.recipe import Recipe, recipe_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")

PACKAGES = (
    "langconvert",
    "torch",
    "transformers",
    "tokenizers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "accelerate",
    "safetensors",
    "numpy",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def prepare_output(recipe: Recipe) -> Path:
    """Fail fast (before any weight is loaded) when the release directory exists and may not be replaced."""
    final = recipe.out_dir
    if final.exists() and not recipe.output.overwrite:
        raise RecipeError(
            f"the release directory '{final}' already exists; remove it, change 'name', or set output.overwrite: true."
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(
            f"output.dir '{final.parent}' cannot be created ({exc.strerror}); choose another."
        ) from None
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_work_dirs(final_dir: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` siblings left by runs that were killed (their process is gone), one log line
    each; a directory whose process still runs is another live run and is left alone."""
    removed = []
    for p in sorted(final_dir.parent.glob(f".{final_dir.name}.tmp-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by a run (pid %s) that no longer exists", p, pid)
        removed.append(p)
    return removed


RESUME_DIR = ".resume"  # pickled stage results of an unfinished run, for --resume (never shipped)


def _rebase(obj: Any, old: Path, new: Path) -> Any:
    """``obj`` with every Path under ``old`` moved under ``new`` (a resumed run's directory has a new name)."""
    import dataclasses

    if isinstance(obj, Path):
        try:
            return new / obj.relative_to(old)
        except ValueError:
            return obj
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _rebase(getattr(obj, f.name), old, new))
    return obj


def find_resumable(final_dir: Path) -> Path | None:
    """The newest unfinished run of this release that --resume can take over: a work directory whose process is
    gone (killed) or ``<name>.failed`` (a stage raised or a gate failed), holding stage results to reuse."""
    candidates = [final_dir.with_name(final_dir.name + ".failed")]
    for p in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            candidates.append(p)
    found = [p for p in candidates if (p / RESUME_DIR).is_dir() and (p / "manifest.json").is_file()]
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime) if found else None


def _apply_umask_modes(root: Path) -> None:
    """Files 0666 and directories 0777 minus the umask (0644 / 0755 under the usual 022), whatever temporary-file
    helpers of the libraries used: a deployment image that runs as another user can read the release."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def return_memory() -> None:
    """Collect garbage (the model builders leave reference cycles holding whole graphs), hand freed heap pages
    back to the OS (glibc's malloc_trim) and unmap the clean checkpoint pages the last stage read, so a stage
    starts from what the run really holds."""
    import ctypes
    import gc

    from converter.load import unmap_clean_checkpoint_pages

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps its own pages
    unmap_clean_checkpoint_pages()  # the checkpoint pages the last stage read stay cached, not resident


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold each time a large block is freed, so later blocks come from the heap, whose
    freed pages it keeps in fragments: the later stages (tokenizer tables, embedding slices, logits of big
    vocabularies, ONNX sessions) then peak ~0.3 GB higher on Gemma 3 270M. The layer walks of prune and gptq
    allocate the same activation sizes thousands of times, where a fresh mapping each time costs about a
    quarter of their time, so the pipeline runs them at glibc's own ceiling (32 MiB, what the dynamic threshold
    reaches) and every other stage at 1 MiB."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixed: no more dynamic raises)
        libc.mallopt(-1, 2 * threshold)  # M_TRIM_THRESHOLD: the dynamic raises had lifted it to twice the above
    except (OSError, AttributeError):
        pass  # not glibc


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _StagePeak:
    """One stage's own peak RSS, without resetting the kernel's high-water mark (VmHWM), which is what
    ``/usr/bin/time -v`` and ``getrusage`` report for the whole run: a stage that raised VmHWM peaked exactly
    there; for one that did not, a thread samples the resident size every 10 ms and keeps the highest."""

    _PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self) -> None:
        self.hwm_start = _status_kib("VmHWM")
        self.peak = self._resident_kib() or 0
        self._stop = threading.Event()
        self._thread = None
        if self.hwm_start is not None:
            self._thread = threading.Thread(target=self._sample, name="langconvert-rss", daemon=True)
            self._thread.start()

    @classmethod
    def _resident_kib(cls) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * cls._PAGE // 1024
        except OSError:
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            now = self._resident_kib() or 0
            if now > self.peak:
                self.peak = now

    def finish(self) -> tuple[float | None, str]:
        """(peak MiB, scope): 'stage' on Linux; elsewhere the run's peak so far from getrusage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hwm = _status_kib("VmHWM")
        if hwm is None or self.hwm_start is None:
            import resource

            return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "run so far"
        peak = max(self.peak, self._resident_kib() or 0)
        if hwm > self.hwm_start:  # the run's new high-water mark was set during this stage
            peak = max(peak, hwm)
        return round(peak / 1024, 1), "stage"


def _cuda_reset() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.reset_peak_memory_stats()
    return True


def _cuda_peak_mb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _rss_mb() -> float | None:
    """Resident memory now (what a stage inherits from the ones before it)."""
    kib = _status_kib("VmRSS")
    return round(kib / 1024, 1) if kib is not None else None


class Manifest:
    def __init__(self, recipe: Recipe, final_dir: Path, device: str, resume: bool = False):
        self.recipe = recipe
        self.final_dir = final_dir
        self.work = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.work, ignore_errors=True)
        # --resume: take over the newest unfinished run's directory (renamed to this run's), with its stage results
        self.previous: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        prev = find_resumable(final_dir) if resume else None
        if prev is not None:
            try:
                self.previous = json.loads((prev / "manifest.json").read_text(encoding="utf-8")).get("stages", {})
            except (OSError, ValueError):
                prev = None
        if prev is not None:
            prev.rename(self.work)
            self.resumed_from = prev
            log.info("resuming from %s", prev)
        elif resume:
            log.info("nothing to resume for %s: no unfinished run of it is left; running every stage", final_dir.name)
        remove_stale_work_dirs(final_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.scratch = self.work / ".scratch"  # intermediate files that never ship (removed by finish)
        self.scratch.mkdir(exist_ok=True)
        self.resume_dir = self.work / RESUME_DIR
        self.resume_dir.mkdir(exist_ok=True)
        self.reuse: set[str] = set()  # stages whose previous result this run takes instead of running them
        self.started = time.time()
        self.stages: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.data: dict[str, Any] = {
            "langconvert_manifest": 1,
            "name": recipe.name,
            "status": "running",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.to_dict(),
            "recipe_sha256": recipe_sha256(recipe),
            "seed": recipe.seed,
            "device": device,
            "host": {
                "machine": platform.machine(),
                "system": platform.system(),
                "processor": platform.processor() or None,
                "cpus": os.cpu_count(),
                "hostname": socket.gethostname(),
            },
            "command": sys.argv,
            "versions": package_versions(),
            "stages": self.stages,
            "files": {},
        }
        self._write()

    @classmethod
    def begin(cls, recipe: Recipe, device: str, resume: bool = False) -> Manifest:
        return cls(recipe, prepare_output(recipe), device, resume)

    def dir(self, name: str) -> Path:
        p = self.work / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def fresh_dir(self, name: str) -> Path:
        """``dir(name)`` emptied first: a stage that runs again must not find a killed attempt's files."""
        shutil.rmtree(self.work / name, ignore_errors=True)
        return self.dir(name)

    def reusable(self, keys: dict[str, str]) -> set[str]:
        """Stages whose previous run finished with the same key (a digest of everything the stage depends on)
        and left its result on disk."""
        out = set()
        for stage, key in keys.items():
            prev = self.previous.get(stage, {})
            if prev.get("status") in ("ok", "reused") and prev.get("key") == key:
                if (self.resume_dir / f"{stage}.pkl").is_file():
                    out.add(stage)
        return out

    def _reuse(self, stage: str, entry: dict[str, Any]) -> Any:
        with (self.resume_dir / f"{stage}.pkl").open("rb") as f:
            result = pickle.load(f)  # written by this tool into this run's own directory
        if self.resumed_from is not None:
            result = _rebase(result, self.resumed_from, self.work)
        prev = self.previous[stage]
        entry.update({k: v for k, v in prev.items() if k not in ("status", "rss_start_mb")})
        entry["status"] = "reused"
        self.results[stage] = result
        self._write()
        log.info("%s: reused from the unfinished run (%.1fs then)", stage, prev.get("seconds", 0.0))
        return result

    def _keep(self, stage: str, result: Any) -> None:
        """Pickle a finished stage's result for --resume; a result that cannot be pickled is simply not kept."""
        tmp = self.resume_dir / f".{stage}.pkl.tmp"
        try:
            with tmp.open("wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(self.resume_dir / f"{stage}.pkl")
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            tmp.unlink(missing_ok=True)
            log.debug("%s: result not kept for --resume (%s)", stage, exc)

    def _write(self) -> None:
        (self.work / "manifest.json").write_text(
            json.dumps(_jsonable(self.data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def record(self, stage: str, fn: Callable[..., T], *args: Any, key: str | None = None, **kwargs: Any) -> T:
        """Run one stage, timing it and storing its summary (or its failure) in the manifest. With a ``key``, the
        result is kept for --resume, and a stage in ``self.reuse`` takes its previous result instead of running."""
        entry: dict[str, Any] = {"status": "running"}
        if key is not None:
            entry["key"] = key
        self.stages[stage] = entry
        if stage in self.reuse:
            return self._reuse(stage, entry)
        (self.resume_dir / f"{stage}.pkl").unlink(missing_ok=True)
        self._write()
        log.info("%s: started", stage)
        return_memory()
        entry["rss_start_mb"] = _rss_mb()
        peak = _StagePeak()
        cuda = _cuda_reset()
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            peak.finish()
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3), error=str(exc))
            if not isinstance(exc, ConvertError):
                entry["traceback"] = traceback.format_exc(limit=20)
            self._write()
            raise
        seconds = time.perf_counter() - t0
        summary = result.summary() if hasattr(result, "summary") else {}
        entry.update(status="ok", seconds=round(seconds, 3), metrics=summary)
        entry["peak_rss_mb"], entry["peak_rss_scope"] = peak.finish()
        if cuda:
            entry["peak_cuda_mb"] = _cuda_peak_mb()
        self.results[stage] = result
        if key is not None:
            self._keep(stage, result)
        self._write()
        headline = summary.get("headline", "") if isinstance(summary, dict) else ""
        log.info("%s: done in %.1fs%s", stage, seconds, f" — {headline}" if headline else "")
        return result

    def _checksums(self) -> dict[str, Any]:
        files = {}
        for p in sorted(self.work.rglob("*")):
            parts = p.relative_to(self.work).parts
            if p.is_file() and p.name != "manifest.json" and not {".scratch", RESUME_DIR} & set(parts):
                rel = p.relative_to(self.work).as_posix()
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        return files

    def finish(self, status: str, report_writer: Callable[[Manifest], None] | None = None) -> Path:
        """Checksums, report, manifest; then the atomic rename. ``status``: ok | gate_failed | failed. An
        unfinished run keeps its scratch files and stage results, so ``--resume`` can take it over."""
        if status == "ok":
            shutil.rmtree(self.scratch, ignore_errors=True)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        self.data["status"] = status
        self.data["seconds"] = round(time.time() - self.started, 3)
        hwm = _status_kib("VmHWM")  # the whole process's peak (what /usr/bin/time -v reports), Linux only
        if hwm is not None:
            # the kernel's counters lag the sampled resident size by a few pages; the run peaked at least as high
            # as any of its stages
            stage_peaks = [e.get("peak_rss_mb") or 0.0 for e in self.stages.values() if e.get("status") == "ok"]
            self.data["peak_rss_mb"] = max([round(hwm / 1024, 1), *stage_peaks])
        if report_writer is not None:
            try:
                report_writer(self)
            except Exception:  # a broken report must not hide the real outcome
                log.exception("writing the report failed")
        self.data["files"] = self._checksums()
        self._write()
        _apply_umask_modes(self.work)
        target = (
            self.final_dir if status == "ok" else self.final_dir.with_name(self.final_dir.name + ".failed")
        )
        if target.exists():
            shutil.rmtree(target)
        self.work.rename(target)
        return target

    def abandon(self, exc: BaseException) -> Path:
        """Called on a failed run: keep what was written, under the .failed name, for inspection."""
        self.data["error"] = str(exc) or type(exc).__name__
        return self.finish("failed")
