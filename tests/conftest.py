"""The suite's fixtures: the small local models come from rayinfer's own pytest plugin
(rayinfer/pytest_plugin.py, the one plugin authors use), under the short names these tests use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def models_dir(rayinfer_models_dir: Path) -> Path:
    return rayinfer_models_dir


@pytest.fixture(scope="session")
def bert_mlm(rayinfer_bert: Path) -> Path:
    return rayinfer_bert


@pytest.fixture(scope="session")
def bert_classifier(rayinfer_bert_classifier: Path) -> Path:
    return rayinfer_bert_classifier


@pytest.fixture(scope="session")
def bert_nsp(rayinfer_bert_nsp: Path) -> Path:
    return rayinfer_bert_nsp


@pytest.fixture(scope="session")
def llama(rayinfer_llama: Path) -> Path:
    """A small random Llama with a chat template and no pad token."""
    return rayinfer_llama


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ri-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
