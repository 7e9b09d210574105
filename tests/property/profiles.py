"""Hypothesis profiles for the property tests: "ci" (default, a few hundred examples per
property, deterministic) and "thorough" (>= 10,000 examples in all), chosen by
QENGINE_HYPOTHESIS_PROFILE=thorough. Applied per test (@PROFILE), so other test modules keep
their own settings."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Examples per property test (13 tests today: 2,600 in CI, 26,000 thorough).
CI_EXAMPLES = 200
THOROUGH_EXAMPLES = 2000

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=THOROUGH_EXAMPLES, **_COMMON)


PROFILE_NAME = os.environ.get("QENGINE_HYPOTHESIS_PROFILE", "ci")
PROFILE = settings(settings.get_profile(PROFILE_NAME))
