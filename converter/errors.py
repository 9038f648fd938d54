"""Error types and the exit codes the CLI maps them to.

Every user-facing failure is one of these, carrying one sentence that names the problem and the fix.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3


class ConvertError(Exception):
    """Base class. ``exit_code`` is what ``langconvert`` exits with."""

    exit_code = EXIT_RUNTIME


class RecipeError(ConvertError):
    """The recipe is malformed: unknown key, wrong type, out-of-range value, inconsistent settings."""

    exit_code = EXIT_BAD_INPUT


class DataError(ConvertError):
    """A calibration/evaluation source is missing, empty or unreadable."""

    exit_code = EXIT_BAD_INPUT


class ModelError(ConvertError):
    """The model cannot be loaded or is of an unsupported family."""

    exit_code = EXIT_BAD_INPUT


class ExportError(ConvertError):
    """ONNX export or quantization failed at run time."""

    exit_code = EXIT_RUNTIME


class GateFailed(ConvertError):
    """One or more validation gates failed; the release directory is still written, marked failed."""

    exit_code = EXIT_GATE_FAILED
