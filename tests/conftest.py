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
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def bert_mlm(models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(models_dir / "bert-mlm", head="masked-lm")


@pytest.fixture(scope="session")
def bert_classifier(models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(models_dir / "bert-cls", head="sequence-classification", labels=["neg", "neu", "pos"])


@pytest.fixture(scope="session")
def bert_nsp(models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(models_dir / "bert-nsp", head="next-sentence")


@pytest.fixture(scope="session")
def llama(models_dir: Path) -> Path:
    """A small random Llama with a chat template and no pad token."""
    from rayinfer.testing import build_causal_lm

    return build_causal_lm(models_dir / "llama")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ri-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
