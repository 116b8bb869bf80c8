"""Shared test configuration: hypothesis profiles and the --slow option.

``python -m pytest`` runs the fast default; ``python -m pytest --slow`` the whole suite.
"""

import os
import pathlib

import jax
from hypothesis import HealthCheck, settings

# Many tests compile the same programs (a clipper on the same shapes): keep what XLA
# compiles on disk, in this checkout's pytest cache, for the rest of the run and later runs.
# Subprocesses (the demo, the notebooks, several devices) read the same cache.
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)

# "default" keeps the suite fast on two cores; "slow" is loaded by --slow (unless
# HYPOTHESIS_PROFILE names another); "thorough" is for long runs:
#   HYPOTHESIS_PROFILE=thorough python -m pytest -m slow
_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("default", max_examples=10, **_common)
settings.register_profile("slow", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (the full suite)"
    )


def pytest_configure(config):
    # before the test modules are imported: @given reads the profile when it decorates
    if config.getoption("--slow") and "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("slow")
    # Before JAX starts its backend. A run on a fresh clone is mostly XLA compiling small
    # programs, about a fifth faster without LLVM's optimizations, and arrays this small
    # run about as fast. With --slow all runs with XLA's default, the code users get.
    flags = os.environ.get("XLA_FLAGS", "")
    if not config.getoption("--slow") and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
