"""rayinfer's pytest plugin (entry point ``pytest11``), for task plugin authors.

Installed with rayinfer, it gives every test session:

- ``rayinfer_models_dir``: a session temp folder for models;
- ``rayinfer_bert`` (masked-LM head), ``rayinfer_bert_classifier`` (labels neg/neu/pos),
  ``rayinfer_bert_nsp``, ``rayinfer_llama`` (causal LM with a chat template, no pad token),
  ``rayinfer_llama_bpe`` (the same with a byte-level BPE tokenizer, as real LLMs have),
  ``rayinfer_t5`` (seq2seq): small random models saved with ``save_pretrained``, with tokenizers
  trained on real English text, built once per session on first use;
- ``rayinfer_run_task``: ``rayinfer.testing.run_task``, a task on a list of rows without Ray;
- ``rayinfer_run_job(task, rows, model, options=None, **spec)``: the task through a real job
  (Parquet in, the embedded Ray, Parquet out); returns the output rows by id.

Nothing heavy is imported until a fixture is used, so the plugin costs nothing to sessions that
do not use it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture(scope="session")
def rayinfer_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rayinfer-models")


@pytest.fixture(scope="session")
def rayinfer_bert(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(rayinfer_models_dir / "bert-mlm", head="masked-lm")


@pytest.fixture(scope="session")
def rayinfer_bert_classifier(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(rayinfer_models_dir / "bert-cls", head="sequence-classification", labels=["neg", "neu", "pos"])


@pytest.fixture(scope="session")
def rayinfer_bert_nsp(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_bert

    return build_bert(rayinfer_models_dir / "bert-nsp", head="next-sentence")


@pytest.fixture(scope="session")
def rayinfer_llama(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_causal_lm

    return build_causal_lm(rayinfer_models_dir / "llama")


@pytest.fixture(scope="session")
def rayinfer_llama_bpe(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_causal_lm

    return build_causal_lm(rayinfer_models_dir / "llama-bpe", tokenizer_kind="bpe")


@pytest.fixture(scope="session")
def rayinfer_t5(rayinfer_models_dir: Path) -> Path:
    from rayinfer.testing import build_t5

    return build_t5(rayinfer_models_dir / "t5")


@pytest.fixture
def rayinfer_run_task() -> Callable[..., list[dict[str, Any]]]:
    from rayinfer.testing import run_task

    return run_task


@pytest.fixture(scope="session")
def _rayinfer_ray():
    """The embedded Ray, started once on first use (and only stopped if this plugin started it)."""
    import ray

    started = False
    temp = None
    if not ray.is_initialized():
        temp = tempfile.mkdtemp(prefix="rayinfer-test-ray-", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
        started = True
    yield ray
    if started:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def rayinfer_run_job(_rayinfer_ray: Any, tmp_path: Path) -> Callable[..., list[dict[str, Any]]]:
    from rayinfer.testing import run_job_on_rows

    def run(task: str, rows: list[dict[str, Any]], model: str | Path, options: dict[str, Any] | None = None,
            **spec: Any) -> list[dict[str, Any]]:
        return run_job_on_rows(task, rows, model, options, workdir=tmp_path / f"job-{task}", **spec)

    return run
