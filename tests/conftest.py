"""The suite's fixtures. The small local models (rayinfer_bert, rayinfer_llama, ...) and the
embedded Ray come from rayinfer's own pytest plugin (rayinfer/pytest_plugin.py), under the names
plugin authors use."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session(_rayinfer_ray):
    """The one embedded Ray of the test session: the plugin's, whichever test asks first (the
    plugin's ``rayinfer_run_job`` and the suite's own jobs share it; starting Ray costs seconds)."""
    return _rayinfer_ray
