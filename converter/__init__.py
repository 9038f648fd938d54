"""langconvert: a multilingual causal LM converted into a slim release for one language market.

Importing the package installs one import hook, ``_LeanTransformers``: when scikit-learn is installed (the
``eval`` and ``test`` extras bring it), transformers' generation module imports it at start-up for one feature of
assisted decoding that langconvert never uses, and with it scipy and pandas: about 150 MB of resident memory in
every process that loads a tokenizer (measured: 480 MB against 333 MB after ``from transformers import
AutoTokenizer``). Loading any model class then imports transformers' object-detection losses, which import
scipy.optimize when scipy is installed: another 33 MB (371 MB against 338 MB after importing Gemma 3's modelling
code). The hook marks scikit-learn and scipy as unavailable to transformers alone, right after transformers reads
its optional packages; other code (lm-eval's metrics, langconvert's dendrograms) imports them as usual.
"""

from __future__ import annotations

import importlib.abc
import sys

_IMPORT_UTILS = "transformers.utils.import_utils"


def _hide_optional(module: object) -> None:
    for flag in ("_sklearn_available", "_scipy_available"):
        if getattr(module, flag, None):
            setattr(module, flag, False)


class _LeanTransformers(importlib.abc.MetaPathFinder):
    """Patches ``transformers.utils.import_utils`` once, after it runs; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 (the finder protocol)
        if fullname != _IMPORT_UTILS:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: object) -> None:
            run(module)
            _hide_optional(module)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if _IMPORT_UTILS in sys.modules:  # transformers came first: too late only if generation is loaded too
    if "transformers.generation" not in sys.modules:
        _hide_optional(sys.modules[_IMPORT_UTILS])
elif not any(isinstance(f, _LeanTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _LeanTransformers())
