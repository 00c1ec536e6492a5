"""The plugin author's path: the scaffold, the example plugin, rayinfer's pytest plugin, and
meta-tests that the docs and examples keep up with the code."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

import rayinfer.hookspecs as hookspecs
from rayinfer.scaffold import TEMPLATES, new_plugin
from rayinfer.task.base import Task
from rayinfer.task.registry import load_registry
from rayinfer.testing import english_sentences, run_task, write_dataset

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
EMBED = ROOT / "plugins" / "examples" / "rayinfer-embed"


def pip_install(site: Path, *packages: Path) -> None:
    """`pip install` of the folders (copies: building writes build/ beside the sources), into
    their own target so the test environment stays clean."""
    copies = []
    for package in packages:
        copy = site.parent / f"src-{package.name}"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        copies.append(str(copy))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), *copies],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def env_with(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env_with(site), cwd=cwd, timeout=600)


@dataclass(frozen=True)
class Scaffold:
    template: str
    model: str  # the rayinfer pytest-plugin fixture its tests and the job use
    inputs: dict[str, str]  # task input -> dataset column of the job
    options: dict[str, Any]  # the job's options


SCAFFOLDS = [
    pytest.param(Scaffold("encoder", "rayinfer_bert_classifier", {"text": "body"}, {}), id="encoder"),
    pytest.param(Scaffold("causal-lm", "rayinfer_llama", {"prompt": "body", "completion": "next"}, {}), id="causal-lm"),
    pytest.param(Scaffold("seq2seq", "rayinfer_t5", {"text": "body"}, {"max_new_tokens": 4}), id="seq2seq"),
]

BROKEN = ('"label": [id2label[i] for i, _ in outputs]', '"label": [id2label[(i + 1) % len(id2label)] for i, _ in outputs]')
"""A postprocessing bug planted in a generated encoder plugin (each row gets the next label): the
plugin's own generated tests must catch it."""


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory):
    """Every template generated as my-TEMPLATE, plus my-broken (the encoder template with the
    ``BROKEN`` postprocessing), the packages installed the way a user installs them (one pip
    call), their generated tests run (one pytest process: its session builds the small models
    once) and `rayinfer plugins` listed, once for the module."""
    root = tmp_path_factory.mktemp("scaffolds")
    packages = {t: new_plugin(f"my-{t}", root, t) for t in TEMPLATES}
    packages["broken"] = new_plugin("my-broken", root, "encoder")
    task_py = packages["broken"] / "rayinfer_my_broken" / "__init__.py"
    assert BROKEN[0] in task_py.read_text()
    task_py.write_text(task_py.read_text().replace(*BROKEN))
    site = root / "site"
    pip_install(site, *packages.values())
    tests = run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *(str(p / "tests") for p in packages.values())],
                site, root)
    listed = run([sys.executable, "-m", "rayinfer", "plugins"], site, root)
    return {"root": root, "site": site, "packages": packages, "tests": tests, "listed": listed}


@pytest.mark.parametrize("case", SCAFFOLDS)
def test_a_scaffolded_plugin_installs_passes_its_own_tests_and_runs_a_job(scaffolded, tmp_path, request, case):
    task, tests = f"my-{case.template}", scaffolded["tests"]
    module = f"test_{task.replace('-', '_')}.py::"  # the generated tests/test_<name>.py
    mine = [line for line in tests.stdout.splitlines() if module in line]
    assert len([line for line in mine if " PASSED" in line]) == 3, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert not [line for line in mine if " FAILED" in line or " ERROR" in line], tests.stdout[-3000:]

    package = "rayinfer_" + task.replace("-", "_")
    assert f"{task}  rayinfer-{task} 0.1.0  {package}  -> {task}" in scaffolded["listed"].stdout

    model = request.getfixturevalue(case.model)
    texts = list(english_sentences()[:31])
    columns = {"doc": [f"d{i}" for i in range(30)], "body": texts[:30], "next": texts[1:]}
    write_dataset(tmp_path / "in", columns, files=2)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "task": task, "model": str(model),
        "input": {"path": str(tmp_path / "in"), "id_column": "doc", "columns": case.inputs},
        "output": {"path": str(tmp_path / "out")}, "options": case.options, "runtime": {"num_cpus": 1},
    }))
    ran = run([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet"], scaffolded["site"], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = {r["doc"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == sorted(columns["doc"])
    # the job's rows equal the installed task run on the same rows without Ray (which the
    # plugin's own tests hold to the model called directly)
    task_cls = installed_task(scaffolded["site"], package)
    rows = [{name: columns[column][i] for name, column in case.inputs.items()} for i in range(30)]
    direct = run_task(task_cls, rows, model, case.options)
    for i, want in enumerate(direct):
        got = out[f"d{i}"]
        assert got["error"] is None and want["error"] is None
        for column, value in want.items():
            assert got[column] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value), (i, column)


def installed_task(site: Path, package: str) -> type[Task]:
    """The Task class a package installed under ``site`` registers (imported from there)."""
    import importlib

    sys.path.insert(0, str(site))
    try:
        module = importlib.import_module(package)
    finally:
        sys.path.remove(str(site))
    [task_cls] = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Task) and v is not Task
                  and v.__module__ == package]
    return task_cls


def test_a_generated_plugins_own_tests_catch_a_postprocessing_bug(scaffolded):
    """my-broken is the encoder template with each row's label shifted in postprocess: both of its
    tests that compare outputs with the model called directly (without Ray and as a job) fail."""
    tests = scaffolded["tests"]
    mine = dict(re.findall(r"test_my_broken\.py::(\w+) (PASSED|FAILED|ERROR)", tests.stdout))
    assert mine == {"test_matches_the_model_called_directly": "FAILED", "test_bad_rows_get_errors": "PASSED",
                    "test_a_real_job_matches_the_model_called_directly": "FAILED"}, tests.stdout[-3000:]


def test_an_unknown_template_is_refused_with_the_choices(tmp_path):
    from rayinfer.errors import SpecError

    with pytest.raises(SpecError, match="template 'decoder': choose one of encoder, causal-lm, seq2seq"):
        new_plugin("x", tmp_path, "decoder")
    assert not (tmp_path / "rayinfer-x").exists()


def test_the_example_plugin_installs_and_passes_its_tests(tmp_path):
    site = tmp_path / "site"
    pip_install(site, EMBED)
    shown = run([sys.executable, "-m", "rayinfer", "tasks", "show", "mean-embed"], site, tmp_path)
    assert shown.returncode == 0 and "normalize (bool, default True)" in shown.stdout
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EMBED / "tests")], site, tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert "3 passed" in tests.stdout


def test_the_tutorial_code_is_the_example_plugin_code():
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```\n", text, flags=re.S)
    files = {path for path, _ in blocks}
    expected = {
        str(p.relative_to(ROOT)) for p in EMBED.rglob("*")
        if p.suffix in (".py", ".toml") and not {"build", "__pycache__"} & set(p.relative_to(EMBED).parts)
    }
    assert files == expected
    for path, code in blocks:
        assert code == (ROOT / path).read_text(), f"docs/plugins.md drifted from {path}"


def test_every_hook_is_documented_and_tested():
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "rayinfer_spec")]
    assert hooks == ["register_tasks"]
    doc = DOCS.read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for hook in hooks:
        signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
        assert f"| `{signature}` |" in doc, f"hook {signature} is not in the hooks table of docs/plugins.md"
        assert f"def {hook}(" in tests, f"no test implements hook {hook}"


def test_every_task_member_is_documented():
    doc = DOCS.read_text()
    members = [n for n in vars(Task) if not n.startswith("_") or n == "__init__"]
    members += list(Task.__annotations__)
    for name in set(members) - {"__init__"}:
        assert f"| `{name}" in doc, f"Task.{name} is not in the reference of docs/plugins.md"


def test_every_built_in_task_has_descriptions_and_an_example_job():
    registry = load_registry(only=None)
    jobs = {yaml.safe_load(p.read_text())["task"] for p in (ROOT / "jobs").glob("*.yaml")}
    built_in = [n for n, plugin in registry.task_plugin.items() if registry.tasks[n].__module__.startswith("rayinfer_tasks")]
    assert sorted(built_in) == ["classify", "embed", "fill-mask", "generate", "nsp", "perplexity", "summarize",
                                "token-classify", "zero-shot-classify"]
    for name in built_in:
        info = registry.get(name).describe()
        assert info["description"] and info["outputs"], name
        assert all(o["description"] for o in info["options"]), name
        assert name in jobs, f"no example job in jobs/ for {name}"
