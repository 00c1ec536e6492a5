"""The suite's fixtures. The small local models (rayinfer_bert, rayinfer_llama, ...) come from
rayinfer's own pytest plugin (rayinfer/pytest_plugin.py), under the names plugin authors use."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ri-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
