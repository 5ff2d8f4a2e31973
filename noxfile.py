"""Test sessions, one per backend, running the same parametrized suite; plus lint and bench.

`nox` runs every test session and lint; `nox -s bench` runs the benchmark.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

# The one place for the framework pins. torch must be exactly this CPU wheel on
# our machines: any other version (or an unpinned torch) pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
JAX = ["jax", "optax"]
TEST = ["pytest", "hypothesis", "scipy", "pytest-xdist"]
# Keras 3 is a test dependency of the torch and jax sessions only (tests/test_keras.py fits a
# model on that Keras backend).
KERAS = "keras"

BACKEND_DEPS = {
    "numpy": [],
    "array-api-strict": ["array-api-strict"],
    "torch": [TORCH, KERAS],
    "jax": [*JAX, KERAS],
}


@nox.session
@nox.parametrize("backend", list(BACKEND_DEPS))
def tests(session: nox.Session, backend: str) -> None:
    """The suite with only this backend's arrays (MULTIXENT_BACKENDS selects them)."""
    session.install(*TEST, *BACKEND_DEPS[backend])
    session.install(".")
    session.run(
        "pytest",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"MULTIXENT_BACKENDS": backend},
    )


def _floors() -> list[str]:
    """``name==floor`` for each ``name>=floor`` of pyproject's dependencies and jax extra."""
    import tomllib

    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["jax"]]
    return [d.replace(">=", "==") for d in declared]


@nox.session
def lowest(session: nox.Session) -> None:
    """The suite on every backend with the lowest declared versions (torch stays at TORCH, the only one here).

    pip resolves the test tools (optax, scipy, array-api-strict, ...) to versions compatible with those pins.
    """
    session.install(*_floors(), *TEST, TORCH, "optax", "array-api-strict")
    session.install("--no-deps", ".")
    session.run("pip", "list", silent=False)
    session.run(
        "pytest",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"MULTIXENT_BACKENDS": "numpy,array-api-strict,torch,jax"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy on the package."""
    session.install("ruff", "mypy", "numpy", "array-api-compat", "array-api-extra")
    session.run("ruff", "check", "multixent", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "multixent")
    session.run("mypy", "multixent")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks (cross_entropy, then linear_cross_entropy): write benchmarks/results/ (not in the default run)."""
    session.install(TORCH, *JAX, "scipy", "matplotlib")
    session.install(".")
    session.run("python", "benchmarks/bench.py", *session.posargs)
    session.run("python", "benchmarks/bench_linear.py", *session.posargs)
