"""The 4 simulated JAX devices of the sharding tests (``distributed/test_jax_sharding.py``,
``distributed/test_shard_map.py``).

They need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is imported, so they run
in their own process: ``nox -s distributed``; with fewer devices :data:`FOUR_DEVICES` skips every test
of a module that takes it as ``pytestmark``. Importing this module skips the importing test module
where JAX is not installed, and turns on float64 (``jax_enable_x64``).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_enable_x64", True)

FOUR_DEVICES = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 (nox -s distributed)",
)


def device_mesh(shape: tuple[int, ...], axes: tuple[str, ...]) -> Mesh:
    """The first 4 devices in a mesh of this shape, its axes named ``axes``."""
    return Mesh(np.array(jax.devices()[:4]).reshape(shape), axes)
