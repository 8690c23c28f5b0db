"""Hypothesis profiles for the suite (choose with `HYPOTHESIS_PROFILE=name`).

  * `ci` (default): derandomized, so every run draws the same examples and a
    failure reproduces on any machine;
  * `dev`: random draws, 4x the examples: for exploring while you work;
  * `nightly`: random draws, 40x the examples: for a long hunting run.

Tests size their example counts with `examples(n)`: n under `ci`, scaled up
under the exploring profiles, so one knob turns every property test up.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"
_SCALE = {"ci": 1, "dev": 4, "nightly": 40}

# Engine-driving examples take tens of milliseconds each: Hypothesis' per-example
# deadline and its "too slow" health check would flag the machine, not the code.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}


def profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in _SCALE:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; use one of {sorted(_SCALE)}")
    return name


def register_profiles() -> None:
    settings.register_profile("ci", derandomize=True, **_COMMON)
    settings.register_profile("dev", max_examples=100 * _SCALE["dev"], **_COMMON)
    settings.register_profile("nightly", max_examples=100 * _SCALE["nightly"], **_COMMON)
    settings.load_profile(profile_name())


def examples(n: int) -> int:
    """`n` examples under the `ci` profile, more under `dev` and `nightly`."""
    return n * _SCALE[profile_name()]
