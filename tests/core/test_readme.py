"""The ```python blocks of the README and of the documentation (docs/*.md) run as written, each in a
fresh process (a block repeated word for word in another page runs once, under its first place).

A block runs when every framework it imports is installed and selected (``MULTIXENT_BACKENDS``):
torch and transformers need the torch backend, jax and optax the JAX one, keras either (its
``KERAS_BACKEND`` is then jax if selected, else torch), and a block importing none of them runs
with the NumPy backend. A block whose first line is ``# not run`` (signatures, not code) is skipped;
one whose first line is ``# torchrun --nproc-per-node N ...`` runs as a file under
``torchrun --standalone --nproc-per-node N`` (N gloo processes on a free local port).

The public functions' docstring Examples (NumPy) run as doctests, which the API reference shows.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from _paths import ROOT
from conftest import SELECTED

import multixent

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> dict[str, str]:
    """Each distinct block's code, keyed by its first place: ``page:first line of code``."""
    blocks: dict[str, str] = {}
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
            if m.group(1) not in blocks.values():
                blocks[f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 2}"] = m.group(1)
    return blocks


BLOCKS = _blocks()
#: the backends (any one suffices) that a block importing this module needs
NEEDS = {
    "torch": ("torch",),
    "transformers": ("torch",),
    "jax": ("jax",),
    "optax": ("jax",),
    "flax": ("jax",),
    "keras": ("jax", "torch"),
    "dask": ("numpy",),
}


def _imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("place", "code"), BLOCKS.items(), ids=list(BLOCKS))
def test_readme_block_runs(place, code, tmp_path):
    if code.startswith("# not run"):
        pytest.skip("marked '# not run'")
    imports = _imports(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    frameworks = sorted(imports & NEEDS.keys()) or ["numpy"]
    for module in frameworks:
        backends = NEEDS.get(module, ("numpy",))
        if not set(backends) & set(SELECTED):
            pytest.skip(f"{module}: none of the backends {backends} selected (MULTIXENT_BACKENDS)")
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    if "keras" in imports:
        env["KERAS_BACKEND"] = "jax" if "jax" in SELECTED and importlib.util.find_spec("jax") else "torch"
        if importlib.util.find_spec(env["KERAS_BACKEND"]) is None:
            pytest.skip(f"keras backend {env['KERAS_BACKEND']} not installed")
    command = [sys.executable, "-c", code]
    if launch := re.match(r"# torchrun --nproc-per-node (\d+)", code):
        (tmp_path / "block.py").write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", launch[1]]
        command += ["block.py"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the block at {place}:\n{result.stderr}"


@pytest.mark.parametrize("name", multixent.__all__)
def test_docstring_examples_run(name):
    if "numpy" not in SELECTED:
        pytest.skip("the Examples use NumPy arrays: the numpy backend is not selected (MULTIXENT_BACKENDS)")
    tests = doctest.DocTestFinder(recurse=False).find(getattr(multixent, name), name)
    assert any(t.examples for t in tests), f"{name}'s docstring has no Examples"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
