"""Suite-wide test settings: the Hypothesis profile every property test runs under.

The suite runs on small, busy machines (2 shared cores in CI). There, wall-clock
checks measure the machine, not the code: a property test whose examples each
sign and verify Ed25519 envelopes can trip Hypothesis' 200 ms deadline or its
"data generation is too slow" health check on a loaded runner while passing on a
quiet laptop. The `meshrun` profile removes only those timing checks:

- same number of examples as each test asks for (Hypothesis' default, 100, where
  a test does not say), so nothing is tested less;
- `deadline=None`: no per-example time limit (pytest-timeout still bounds a test);
- `suppress_health_check=[too_slow]`: only the timing health check is silenced;
  the others (filter_too_much, data_too_large, ...) still fail a test that
  generates badly;
- random, not derandomized: every run explores new examples, and a failure is
  reproducible from the seed Hypothesis prints.

The profile is loaded here, before any test module is imported, because a
`@settings(...)` decorator copies the active profile's values for every setting
it does not name when the module is imported. A per-test `@settings` may change
`max_examples`, but must not set `deadline` or `suppress_health_check` back.

Pick another profile with `HYPOTHESIS_PROFILE=dev pytest ...` (few examples, for
quick local iterations) or `pytest --hypothesis-profile=NAME`.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"
DEFAULT_PROFILE = "meshrun"

settings.register_profile(
    "meshrun",
    # Parent named explicitly: Hypothesis switches itself to its own "ci" profile
    # (derandomized, no example database) when $CI is set; ours must not inherit that.
    settings.get_profile("default"),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)
# Quick local loops: 10 examples for tests that do not set max_examples themselves.
settings.register_profile("dev", settings.get_profile("meshrun"), max_examples=10)

settings.load_profile(os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)


def _hypothesis_settings(item: pytest.Item) -> settings | None:
    """The settings a Hypothesis test will run with (`@given` tests and state machines)."""
    found = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
    if found is None:
        found = getattr(getattr(item, "cls", None), "settings", None)
    return found if isinstance(found, settings) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a run in which a per-test `@settings` sets the profile's timing rules back."""
    active = settings()
    wrong = []
    for item in items:
        own = _hypothesis_settings(item)
        if own is None:
            continue
        if active.deadline is None and own.deadline is not None:
            wrong.append(f"{item.nodeid}: deadline={own.deadline}")
        missing = set(active.suppress_health_check) - set(own.suppress_health_check)
        if missing:
            wrong.append(f"{item.nodeid}: health checks {sorted(h.name for h in missing)} on")
    if wrong:
        raise pytest.UsageError(
            f"these tests override the {settings.get_current_profile_name()!r} Hypothesis "
            "profile's timing rules (see tests/conftest.py):\n  " + "\n  ".join(wrong)
        )
