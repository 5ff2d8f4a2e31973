"""Test sessions, one per backend, running the same parametrized suite; plus lint and bench.

`nox` runs every test session and lint; `nox -s bench` runs the benchmark.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lowest", "distributed", "accelerator", "language_models", "gpu", "docs", "lint"]
nox.options.reuse_existing_virtualenvs = True

# The one place for the framework pins. torch must be exactly this CPU wheel on
# our machines: any other version (or an unpinned torch) pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
JAX = ["jax", "optax"]
TEST = ["pytest", "hypothesis", "scipy", "pytest-xdist", "mpmath", "ml_dtypes"]
# dask and dask.distributed move in step: through dask's own extra, which pins distributed to dask's version
# (unpinned, pip may pair the newest dask with an old distributed that accepts any dask and fails to import).
DASK = "dask[array]"
DASK_DISTRIBUTED = "dask[array,distributed]"
# Keras 3 is a test dependency of the torch and jax sessions only (tests/frameworks/test_keras.py fits a
# model on that Keras backend).
KERAS = "keras"

BACKEND_DEPS = {
    "numpy": [DASK],  # dask arrays are NumPy-backed: their tests and README block run here
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
    _suite(session, backend)


def _suite(
    session: nox.Session,
    backends: str,
    *pytest_args: str,
    env: dict[str, str] | None = None,
    dist: str = "worksteal",
) -> None:
    """The parametrized suite on these backends (MULTIXENT_BACKENDS, comma-separated), on two workers.

    dist: xdist's distribution. worksteal (the default): a worker left idle takes the other's queued tests
    (the slow ones cluster by file); loadfile: a test file each at a time (module fixtures run once per file).
    """
    args = ["pytest", "-n", "2", "--dist", dist, "-p", "no:cacheprovider", *pytest_args, *session.posargs]
    session.run(*args, env={"MULTIXENT_BACKENDS": backends, **(env or {})})


#: the environment of the tests on 4 simulated JAX devices and several processes; XLA_FLAGS must be set
#: before JAX starts: a process of their own
SCALED_OUT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "MULTIXENT_DISTRIBUTED": "1"}


#: The tests that expect an IndexError for an out-of-range class index (the accelerator strategy's device-side
#: check raises torch's RuntimeError instead).
INDEX_ERRORS = "test_bad_input and index or test_every_integer_width or test_fuzz_target_dtypes or test_index_error"

#: The accelerator strategy forced on CPU tensors (its private switch), and with its pass compiled.
FORCED = {"MULTIXENT_ACCELERATOR_ON_CPU": "1"}
COMPILED = {**FORCED, "MULTIXENT_COMPILED_STRATEGY": "1"}
#: The suite as those run it: not ``slow``, without the tests that expect an IndexError (a RuntimeError there).
NOT_SLOW_NOR_INDEX_ERRORS = ("-m", "not slow", "-k", f"not ({INDEX_ERRORS})")


@nox.session
def accelerator(session: nox.Session) -> None:
    """The torch suite with the accelerator strategy (one block, no host read, class indices asserted on the
    device) forced on CPU tensors (``MULTIXENT_ACCELERATOR_ON_CPU=1``); the tests that expect an IndexError for
    an index out of range with ``MULTIXENT_SYNC_CHECKS=1`` (the indices read on the host, as when debugging).
    Tests marked ``slow`` are left to `tests`. Then the fused route's autograd contract (hooks, in-place
    changes, retained graphs) with the strategy's pass compiled (``MULTIXENT_COMPILED_STRATEGY=1``)."""
    session.install(*TEST, TORCH)
    session.install(".")
    _suite(session, "torch", *NOT_SLOW_NOR_INDEX_ERRORS, env=FORCED)
    _suite(session, "torch", "-m", "not slow", "-k", INDEX_ERRORS, env={**FORCED, "MULTIXENT_SYNC_CHECKS": "1"})
    _suite(session, "torch", "tests/frameworks/test_fused_contract.py", env=COMPILED)


@nox.session
def compiled_strategy(session: nox.Session) -> None:
    """Not in the default run (about 7 minutes here): the torch suite (not ``slow``) with the accelerator strategy
    forced on CPU tensors and its loss-and-gradient pass compiled (``MULTIXENT_COMPILED_STRATEGY=1``;
    ``tests/conftest.py`` lifts dynamo's recompile limit, so that every kind of call compiles rather than the
    ninth and later running the eager pass). Run it when the compiled strategy or the formulas change; it joins
    the default run if the strategy becomes the accelerators' default."""
    session.install(*TEST, TORCH)
    session.install(".")
    _suite(session, "torch", *NOT_SLOW_NOR_INDEX_ERRORS, env=COMPILED)


def _floors(*extras: str) -> list[str]:
    """``name==floor`` for each ``name>=floor`` of pyproject's dependencies and these extras; a name
    declared twice gets its higher floor (the jax extra raises numpy's: JAX's floor needs NumPy 2)."""
    import tomllib
    from packaging.version import Version

    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    floors: dict[str, str] = {}
    for declared in [*project["dependencies"], *(d for e in extras for d in project["optional-dependencies"][e])]:
        name, floor = declared.split(">=")
        floors[name] = max(floor, floors.get(name, floor), key=Version)
    return [f"{name}=={floor}" for name, floor in floors.items()]


#: The files run at the floors on torch and JAX arrays: those that go through every dependency API
#: multixent calls (namespaces, dtypes, indexing, validation, compile, shard_map) — values, errors,
#: habits, the compiled paths. The whole suite at the floors took 35 min (2026-12-02), beyond CI's
#: budget; the autodiff/torch.func/linear/Keras matrices repeat those calls on more shapes.
FLOOR_FILES = ["tests/core/test_values.py", "tests/core/test_contract.py", "tests/core/test_errors.py"]
FLOOR_FILES += ["tests/frameworks/test_habits.py", "tests/frameworks/test_compiled_paths.py"]

#: The shard_map tests run at the jax floor: one of each JAX API ``group=`` relies on (``lax.pcast``, ``psum``/
#: ``pmax`` over two axes, ``vmap`` inside ``shard_map`` -- 0.8.2 and 0.8.3 fail it --, the replication
#: types behind the errors, traced options, ``linear_cross_entropy``'s column parallelism). The whole file
#: took 170 s there (2026-12-02); the rest repeats those calls on more options, and runs in `distributed`.
FLOOR_SHARD_MAP = [
    "test_value_and_grad_equal_the_unsharded_call[every-option-sum-float64-two-axes]",
    "test_vmap_inside_shard_map",
    "test_errors",
    "test_linear_classifier_not_split_is_an_error",
    "test_linear_cross_entropy_column_parallel[every-option]",
    "test_traced_options[indices]",
    "test_out_of_range_target_is_nan_when_traced",
]

#: the lowest-versions runs: the extras whose floors join the dependencies', and per backend list the
#: files run (empty: the whole suite). Two environments, since the jax floor needs NumPy >= 2 and the
#: dependencies' floor is NumPy 1.26.
LOWEST = {
    "core": ((), {"numpy,array-api-strict": [], "torch": FLOOR_FILES}),
    "jax": (("jax",), {"jax": FLOOR_FILES}),
}


@nox.session
@nox.parametrize("floors", list(LOWEST))
def lowest(session: nox.Session, floors: str) -> None:
    """Tests with the lowest declared versions (torch stays at TORCH, the only CPU wheel here; gpu_versions
    runs the torch extra's floor): the dependencies' floors with the whole suite on numpy and array-api-strict
    arrays and :data:`FLOOR_FILES` on torch's; the jax extra's with those files on JAX arrays, then
    :data:`FLOOR_SHARD_MAP` (``lax.pcast``, ``axis_size``, ``check_vma``: the reason for the jax
    floor) on 4 simulated devices. Tests marked ``slow`` are left to `tests`.

    pip resolves the test tools (optax, scipy, array-api-strict, ...) to versions compatible with those pins.
    """
    extras, runs = LOWEST[floors]
    framework = [TORCH] if "torch" in runs else ["optax"]
    session.install(*_floors(*extras), *TEST, *framework, "array-api-strict")
    session.install("--no-deps", ".")
    session.run("pip", "list", silent=False)
    for backends, files in runs.items():
        _suite(session, backends, "-m", "not slow", *files)
    if floors == "jax":
        shard_map = [f"tests/distributed/test_shard_map.py::{t}" for t in FLOOR_SHARD_MAP]
        _suite(session, "jax", *shard_map, env=SCALED_OUT)


@nox.session
def distributed(session: nox.Session) -> None:
    """Scaling out: tests/distributed/ -- jax.jit with NamedSharding and shard_map on 4 simulated CPU
    devices, torch groups and DTensor on 2 gloo processes --, and dask (with an out-of-core
    dask.distributed run). XLA_FLAGS must be set before JAX starts: its own process."""
    session.install(*TEST, *JAX, TORCH, DASK_DISTRIBUTED)
    session.install(".")
    # a test file each at a time per worker: module fixtures run the torch ranks once per file
    files = ["tests/distributed", "tests/frameworks/test_dask.py"]
    _suite(session, "numpy", *files, env=SCALED_OUT, dist="loadfile")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format), and mypy (strict) on the package with the frameworks it adapts installed
    (torch, JAX, dask, Keras, transformers: their types are checked, not taken as ``Any``); then the gates:
    no function of the package above cyclomatic complexity 15 (.ci/complexity.py, radon's count), and
    its layers (tests/core/test_layers.py: no import cycle, no module importing another's private name,
    imports one way)."""
    session.install("ruff", "mypy", "radon", "pytest", TORCH, *JAX, DASK, KERAS, "transformers")
    session.install(".")
    sources = ["multixent", "tests", "benchmarks", "noxfile.py", ".ci"]
    session.run("ruff", "check", *sources)
    session.run("ruff", "format", "--check", *sources)
    session.run("mypy", "multixent")
    session.run("python", ".ci/complexity.py", "--max", "15", "multixent")
    session.run("pytest", "-p", "no:cacheprovider", "tests/core/test_layers.py", env={"MULTIXENT_BACKENDS": "numpy"})


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark through asv, then benchmarks/report.py: writes benchmarks/results/ (not in the default run).

    Arguments go to `asv run`: `nox -s bench -- --bench 'linear'` runs the linear cases only,
    `-- --quick` one call per case. MULTIXENT_BENCH_GRID=accept measures the acceptance points only;
    MULTIXENT_BENCH_GRID=tiny swaps every size for a small one and
    MULTIXENT_BENCH_OUT=DIR writes the report elsewhere (a check of the pipeline, not a measurement).
    asv's raw results stay in benchmarks/.asv/results (report.py reads the newest).
    """
    session.install(TORCH, *JAX, "scipy", "matplotlib", "asv")
    session.install(".")
    out = os.environ.get("MULTIXENT_BENCH_OUT", "results")
    session.chdir("benchmarks")
    session.run("asv", "machine", "--yes")
    # --python=same: this environment, no per-commit builds; the results are saved under HEAD's hash.
    asv_run = ["asv", "run", "--python=same", "--set-commit-hash=HEAD", "--record-samples", "--show-stderr"]
    session.run(*asv_run, *session.posargs, success_codes=[0, 2])
    session.run("python", "report.py", "--out", out)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation (MkDocs-Material, mkdocs.yml): docs/*.md and the API reference from the
    docstrings (mkdocstrings, numpy style), with warnings as errors; the site goes to the session's
    tmp folder. mkdocstrings reads the docstrings from the source (griffe), importing nothing: no
    framework needed. The pages' code blocks run in tests/core/test_readme.py.
    """
    session.install("mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff")  # ruff formats the signatures
    site = os.path.join(session.create_tmp(), "site")
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
@nox.parametrize("transformers", ["4.57.*", "latest"])
def language_models(session: nox.Session, transformers: str) -> None:
    """multixent.transformers (tiny Llama, Qwen2, Mistral, Gemma 2, GPT-2, Phi-3, Phi; the Trainer) and
    the Flax NNX example, with transformers 4.57 and its newest release (accelerate: the Trainer's)."""
    spec = "transformers" if transformers == "latest" else f"transformers=={transformers}"
    session.install(*TEST, TORCH, *JAX, "flax", "accelerate", spec)
    session.install(".")
    _suite(session, "torch,jax", "tests/frameworks/test_lm_transformers.py", "tests/frameworks/test_lm_flax.py")


#: The GPU machine's torch (its page in the device tool: torch 2.11, on Python 3.12), and the torch extra's floor
#: (pyproject.toml). PyPI's wheel is a CUDA build (about 4.7 GB with its libraries), which runs on the CPU.
GPU_MACHINE_TORCH = "torch==2.11.0"


@nox.session
def gpu_versions(session: nox.Session) -> None:
    """Not in the default run (about 15 minutes here, and the download): before a GPU run, on the CPU with the
    GPU machine's torch (the torch extra's floor too), the torch suite, then (not ``slow``) with the accelerator
    strategy forced and with its pass compiled, then the GPU check's dry run. What changes between torch
    releases (dynamo's tracing rules, meta kernels, ``out_dtype`` products) fails here, not in the GPU
    machine's few minutes."""
    session.install(*TEST, GPU_MACHINE_TORCH, KERAS)
    session.install(".")
    _suite(session, "torch")
    _suite(session, "torch", *NOT_SLOW_NOR_INDEX_ERRORS, env=FORCED)
    _suite(session, "torch", *NOT_SLOW_NOR_INDEX_ERRORS, env=COMPILED)
    session.run("bash", "benchmarks/gpu_check.sh", "--dry", external=True)


@nox.session
def gpu(session: nox.Session) -> None:
    """benchmarks/gpu_check.sh, the GPU machine's one command: where this session's torch sees a CUDA GPU, the
    CUDA tests and benchmarks/gpu.py's whole check (parity on CUDA tensors, GPU JAX and CuPy arrays; the grid
    against the native losses; writes benchmarks/results/gpu.md within ~5 minutes); elsewhere ``--dry`` (tiny
    sizes on the CPU, the accelerator strategy forced on CPU tensors, the report in a temporary folder), so
    that CI keeps the script and its shell wrapper from rotting. Arguments go to gpu.py. A GPU machine without
    network runs the wrapper directly, after it installs what is missing from ``wheels/`` (DEVELOPERS.md).
    """
    session.install(*TEST, TORCH, *JAX)
    session.install(".")
    probe = "import torch; print(torch.cuda.is_available())"
    cuda = (session.run("python", "-c", probe, silent=True) or "").strip().endswith("True")
    dry = [] if cuda else ["--dry"]
    session.run("bash", "benchmarks/gpu_check.sh", *dry, *session.posargs, external=True)
