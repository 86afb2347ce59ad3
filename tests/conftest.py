"""Suite-wide settings: hypothesis explores new examples locally, replays fixed ones in CI.

Under ``CI=true`` (how `.ci/run` is invoked) hypothesis is derandomized, so a CI run is
repeatable; a developer's runs keep exploring fresh random examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")
