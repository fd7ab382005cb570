"""Test-wide JAX settings (8 simulated CPU devices, the persistent compilation cache) and shared fixtures.

The settings must be made before jax is imported anywhere, which is why they live here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "ADAMERGING_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adamerging_jax", "jax-tests")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import subprocess  # noqa: E402

import pytest  # noqa: E402

import adamerging_jax as am  # noqa: E402
from tiny_problem import make_problem  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    """The tiny 4-task problem of tests/tiny_problem.py (fine-tuned models included)."""
    return make_problem()


@pytest.fixture(scope="module")
def tv(problem):
    """Its stacked task vectors."""
    return am.task_vectors(problem.pretrained, problem.finetuned)


@pytest.fixture
def x64():
    """float64 on for one test (``jax.enable_x64``), restored afterwards so other tests are unaffected."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MB tmpfs mounted in the test's folder, for a full disk (needs root and mount rights; skipped where it
    cannot be): fill it with a file of what is left (``os.statvfs``) and a write there fails with ENOSPC."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
