"""The checkout's files, for the tests in every folder under ``tests/``: the repository root, and a
script of it (``benchmarks/passes.py``, ``examples/flax_lm.py``) loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: the repository root (this file is ``tests/_paths.py``)
ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str) -> ModuleType:
    """The script ``ROOT / relative`` run as the module ``name`` (in ``sys.modules`` under that name, for
    what looks its module up: dataclasses, pickles)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None, relative
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
