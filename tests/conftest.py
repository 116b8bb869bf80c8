"""Shared test configuration: hypothesis profiles and the --slow option.

``python -m pytest`` runs the fast default; ``python -m pytest --slow`` the whole suite.
"""

import os

from hypothesis import HealthCheck, settings

# "default" keeps the suite fast on two cores; "thorough" is for the slow runs:
#   HYPOTHESIS_PROFILE=thorough python -m pytest -m slow
_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("default", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (the full suite)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
