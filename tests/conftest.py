"""Shared test configuration: hypothesis profiles (no deadlines on this shared 2-core machine)."""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True
)
settings.register_profile(  # a longer search before a release or after changing an equation
    "thorough", parent=settings.get_profile("default"), max_examples=1000
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# the shared helpers (tiny.py) import as top-level modules from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))
