"""The plugin author's path: the scaffold, the example plugin, rayinfer's pytest plugin, and
meta-tests that the docs and examples keep up with the code."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
import pytest
import yaml

import rayinfer.hookspecs as hookspecs
from rayinfer.scaffold import TEMPLATES, new_plugin
from rayinfer.task.base import Task
from rayinfer.task.registry import load_registry

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


SCAFFOLDS = ["encoder", "causal-lm", "seq2seq"]

BROKEN = ('"label": [id2label[i] for i, _ in outputs]', '"label": [id2label[(i + 1) % len(id2label)] for i, _ in outputs]')
"""A postprocessing bug planted in a generated encoder plugin (each row gets the next label): the
plugin's own generated tests must catch it."""


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory):
    """Every template generated as my-TEMPLATE, plus my-broken (the encoder template with the
    ``BROKEN`` postprocessing) and the example plugin (plugins/examples/rayinfer-embed), the
    packages installed the way a user installs them (one pip call), their own tests run (one
    pytest process: its session builds the small models and starts its Ray once) and `rayinfer
    plugins` listed, once for the module."""
    root = tmp_path_factory.mktemp("scaffolds")
    packages = {t: new_plugin(f"my-{t}", root, t) for t in TEMPLATES}
    packages["broken"] = new_plugin("my-broken", root, "encoder")
    task_py = packages["broken"] / "rayinfer_my_broken" / "__init__.py"
    assert BROKEN[0] in task_py.read_text()
    task_py.write_text(task_py.read_text().replace(*BROKEN))
    site = root / "site"
    pip_install(site, *packages.values(), EMBED)
    tests = run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                 *(str(p / "tests") for p in packages.values()), str(EMBED / "tests")], site, root)
    listed = run([sys.executable, "-m", "rayinfer", "plugins"], site, root)
    return {"root": root, "site": site, "packages": packages, "tests": tests, "listed": listed}


@pytest.mark.parametrize("template", SCAFFOLDS)
@pytest.mark.slow
def test_a_scaffolded_plugin_installs_is_listed_and_passes_its_own_tests(scaffolded, template):
    """Its own tests hold its outputs to the model called directly, without Ray and as a real job
    on Ray (the job finds the task through the installed package's entry point)."""
    task, tests = f"my-{template}", scaffolded["tests"]
    mine = dict(re.findall(rf"test_{task.replace('-', '_')}\.py::(\w+) (PASSED|FAILED|ERROR)", tests.stdout))
    assert len(mine) == 3 and set(mine.values()) == {"PASSED"}, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert any(name.startswith("test_a_real_job") for name in mine)
    package = "rayinfer_" + task.replace("-", "_")
    assert f"{task}  rayinfer-{task} 0.1.0  {package}  -> {task}" in scaffolded["listed"].stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_example_plugin_installs_and_passes_its_tests(scaffolded):
    """plugins/examples/rayinfer-embed, installed with the scaffolds (one pip call): its task is
    listed and shown, and its own three tests pass (in the scaffolds' pytest process)."""
    site, root = scaffolded["site"], scaffolded["root"]
    shown = run([sys.executable, "-m", "rayinfer", "tasks", "show", "mean-embed"], site, root)
    assert shown.returncode == 0 and "normalize (bool, default True)" in shown.stdout
    assert "mean-embed" in scaffolded["listed"].stdout
    tests = scaffolded["tests"]
    mine = dict(re.findall(r"examples/rayinfer-embed/tests/test_embed\.py::(\w+) (PASSED|FAILED|ERROR)", tests.stdout))
    assert mine == {"test_equals_mean_pooling_one_text_at_a_time": "PASSED", "test_bad_and_long_rows": "PASSED",
                    "test_a_real_local_job_equals_mean_pooling": "PASSED"}, tests.stdout[-3000:] + tests.stderr[-3000:]


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
