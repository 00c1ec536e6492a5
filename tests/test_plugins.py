"""Plugins found through the `rayinfer` entry-point group, as a user installs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import fill_mask_job

from rayinfer.errors import PluginError, UnknownTaskError
from rayinfer.task.registry import load_registry

TOKEN_COUNT = '''
from typing import Any
import pyarrow as pa
from pydantic import Field
from rayinfer import Task, TaskOptions, hookimpl

class TokenCount(Task):
    name = "{task}"
    description = "Count the tokens of each text with the model's tokenizer."

    class Options(TaskOptions):
        add_special_tokens: bool = Field(False, description="Count [CLS]/[SEP] too.")

    @classmethod
    def output_schema(cls, options):
        return pa.schema([("num_tokens", pa.int64())])

    def load(self):
        from rayinfer.models import load_tokenizer
        self.tokenizer = load_tokenizer(self.context)

    def preprocess(self, batch):
        enc = self.tokenizer(batch["text"], add_special_tokens=self.options.add_special_tokens)
        return [{{"input_ids": ids}} for ids in enc["input_ids"]]

    def forward(self, items):
        return [len(i["input_ids"]) for i in items]

    def postprocess(self, outputs, batch):
        return {{"num_tokens": list(outputs)}}

@hookimpl
def register_tasks(register):
    register(TokenCount)
'''


def install_fake_dist(site: Path, dist: str, module: str, body: str, ep_name: str | None = None) -> None:
    """What `pip install` leaves behind: a module and a dist-info with entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[rayinfer]\n{ep_name or dist} = {module}\n")


def cli(*args: str, site: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "rayinfer", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.mark.slow
def test_third_party_plugin_is_listed_and_runs(tmp_path, rayinfer_bert):
    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-tokcount", "rayinfer_tokcount", TOKEN_COUNT.format(task="token-count"))

    listed = cli("plugins", site=site)
    assert listed.returncode == 0, listed.stderr
    assert "rayinfer-tokcount  rayinfer-tokcount 0.3.1  rayinfer_tokcount  -> token-count" in listed.stdout
    assert "fill-mask  rayinfer" in listed.stdout
    shown = cli("tasks", "show", "token-count", "--json", site=site)
    assert json.loads(shown.stdout)["options"][0]["description"] == "Count [CLS]/[SEP] too."

    job = fill_mask_job(tmp_path, rayinfer_bert, rows=40, task="token-count", options={})
    ran = cli("run", str(job), "--set", "task=token-count", "--set", "options={}", site=site)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "40 rows (40 this run, 0 resumed), 0 with errors" in ran.stdout
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["doc_id"] for r in out) == list(range(1000, 1040))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rayinfer_bert)
    texts = {r["doc_id"]: r for r in out}
    from helpers import masked_corpus

    corpus = masked_corpus(40)
    for i, text in zip(corpus["doc_id"], corpus["sentence"]):
        assert texts[i]["num_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


def test_duplicate_task_names_name_both_plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_fake_dist(site, "dup-one", "dup_one", TOKEN_COUNT.format(task="fill-mask"))
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="task 'fill-mask' is registered twice: by plugin 'dup-one' and by plugin 'fill-mask'"):
        load_registry()
    # restricting plugins resolves the clash
    monkeypatch.setenv("RAYINFER_LOAD_PLUGINS", "fill-mask,classify")
    assert sorted(load_registry().tasks) == ["classify", "fill-mask"]


def test_a_broken_plugin_is_contained_and_named(tmp_path, monkeypatch, capsys, caplog):
    site = tmp_path / "site"
    install_fake_dist(site, "broken-plugin", "broken_plugin", "import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(site))
    registry = load_registry()
    assert {"classify", "fill-mask"} <= set(registry.tasks)
    # on stderr once the CLI's handler is installed, else in the log records
    assert "plugin 'broken-plugin' failed to load: ModuleNotFoundError" in capsys.readouterr().err + caplog.text
    with pytest.raises(UnknownTaskError, match=r"unknown task 'sentiment'.*failed to load: broken-plugin \(ModuleNotFoundError"):
        registry.get("sentiment")


def test_cli_listing_does_not_import_torch_or_transformers(tmp_path):
    probe = textwrap.dedent(
        """
        import sys
        from rayinfer.cli import main
        for args in (["tasks"], ["--help"], ["tasks", "show", "classify"], ["plugins"]):
            try:
                main(args)
            except SystemExit as e:
                assert e.code in (0, None), (args, e.code)
        heavy = [m for m in ("torch", "transformers", "ray") if m in sys.modules]
        print("HEAVY:", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY: []" in out.stdout


@pytest.mark.parametrize("entry", [pytest.param(["-m", "rayinfer"], id="python -m rayinfer"),
                                   pytest.param(["-m", "rayinfer.cli"], id="python -m rayinfer.cli")])
def test_every_entry_point_lists_every_command(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == {"demo", "jobs", "logs", "models", "new-plugin", "plugins", "retry-errors", "run", "status", "stop", "submit",
                      "tasks", "validate"}


def test_user_errors_exit_non_zero_without_traceback(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    result = cli("run", str(job), "--set", "task=nope")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("rayinfer: error: unknown task 'nope'")
    assert "Traceback" not in result.stderr


@dataclass(frozen=True)
class WrongHook:
    line: str  # replaces the plugin's `def register_tasks(register):`
    message: str  # in the plugin's load error


@pytest.mark.parametrize("case", [
    pytest.param(WrongHook("def register_task(register):",
                           "hook 'register_task' is not a rayinfer hook (did you mean 'register_tasks'?)"), id="misspelt hook"),
    pytest.param(WrongHook("def register_tasks(register, extra):", "register_tasks"), id="wrong arguments"),
    pytest.param(WrongHook("def other_name(register):",
                           "hook 'other_name' is not a rayinfer hook (rayinfer's hooks: register_tasks)"), id="unknown hook"),
])
def test_a_plugin_with_a_wrong_hook_is_a_load_error_naming_it(tmp_path, monkeypatch, capsys, caplog, case):
    line, message = case.line, case.message
    body = TOKEN_COUNT.format(task="token-count").replace("def register_tasks(register):", line)
    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-tokcount", f"rayinfer_tokcount_{tmp_path.name}", body)
    monkeypatch.syspath_prepend(str(site))
    registry = load_registry()
    [info] = [p for p in registry.plugins if p.name == "rayinfer-tokcount"]
    assert info.error and message in info.error and not info.tasks
    assert "plugin 'rayinfer-tokcount' failed to load" in capsys.readouterr().err + caplog.text
    with pytest.raises(UnknownTaskError, match="Plugins that failed to load: rayinfer-tokcount"):
        registry.get("token-count")
    assert {"classify", "fill-mask"} <= set(registry.tasks)


def test_rayinfer_plugins_names_a_misspelt_hook_and_exits_1(tmp_path):
    body = TOKEN_COUNT.format(task="token-count").replace("def register_tasks(register):", "def register_task(register):")
    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-tokcount", "rayinfer_tokcount", body)
    listed = cli("plugins", site=site)
    assert listed.returncode == 1
    assert ("rayinfer-tokcount  rayinfer-tokcount 0.3.1  rayinfer_tokcount  -> FAILED: "
            "hook 'register_task' is not a rayinfer hook (did you mean 'register_tasks'?)") in listed.stdout
    assert "fill-mask  rayinfer" in listed.stdout  # the others still load
    assert listed.stderr.strip().endswith(
        "rayinfer: error: plugins that failed to load: rayinfer-tokcount (their tasks are missing)")


def test_a_task_with_no_way_to_load_a_model_is_a_load_error(tmp_path, monkeypatch):
    body = TOKEN_COUNT.format(task="token-count").replace(
        "    def load(self):\n        from rayinfer.models import load_tokenizer\n        self.tokenizer = load_tokenizer(self.context)\n", "")
    assert "def load" not in body
    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-tokcount", f"rayinfer_tokcount_{tmp_path.name}", body)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="task 'token-count' neither declares `requires = ModelRequirement"):
        load_registry()


def test_a_plugin_module_without_hooks_says_how_to_mark_one(tmp_path, monkeypatch):
    body = TOKEN_COUNT.format(task="token-count").replace("@hookimpl\n", "")
    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-tokcount", f"rayinfer_tokcount_{tmp_path.name}", body)
    monkeypatch.syspath_prepend(str(site))
    [info] = [p for p in load_registry().plugins if p.name == "rayinfer-tokcount"]
    assert "implements no rayinfer hook: mark its register_tasks function with @rayinfer.hookimpl" in info.error
