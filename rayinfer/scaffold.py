"""``rayinfer new-plugin NAME --template T``: a task plugin package whose own tests pass as generated.

The templates are files under ``rayinfer/templates/`` (``common/`` for every package, one folder
per template with ``task.py.tmpl`` and ``test.py.tmpl``), with ``{{name}}`` placeholders filled in here.
"""

from __future__ import annotations

import re
from pathlib import Path

from rayinfer.errors import SpecError

TEMPLATES = {
    "encoder": "label texts with a sequence-classification head (BERT-style encoders); "
    "tests on rayinfer_bert_classifier",
    "causal-lm": "score a completion after a prompt by its log-likelihood under a causal LM (rayinfer.text's "
    "continuation_logprobs); tests on rayinfer_llama",
    "seq2seq": "rewrite texts with an encoder-decoder (T5, BART) and generate; tests on rayinfer_t5",
}
TEMPLATE_DIR = Path(__file__).parent / "templates"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_SLOT = re.compile(r"\{\{(\w+)\}\}")


def new_plugin(task: str, parent: str | Path = ".", template: str = "encoder") -> Path:
    """Write the package ``rayinfer-<task>`` from ``template`` under ``parent``; return its folder."""
    if not _NAME.match(task):
        raise SpecError(f"plugin name {task!r}: use lower-case words joined by '-', e.g. 'toxicity-score'")
    if template not in TEMPLATES:
        raise SpecError(f"template {template!r}: choose one of {', '.join(TEMPLATES)}")
    from rayinfer.version import __version__

    dist = f"rayinfer-{task}"
    package = "rayinfer_" + task.replace("-", "_")
    values = {
        "dist": dist, "task": task, "package": package, "template": template, "rayinfer_version": __version__,
        "cls": "".join(w.capitalize() for w in task.split("-")) + "Task",
    }
    root = Path(parent) / dist
    if root.exists():
        raise SpecError(f"{root} already exists")
    files = {
        "pyproject.toml": "common/pyproject.toml.tmpl",
        "README.md": "common/README.md.tmpl",
        f"{package}/__init__.py": f"{template}/task.py.tmpl",
        f"tests/test_{package.removeprefix('rayinfer_')}.py": f"{template}/test.py.tmpl",
    }
    for target, source in files.items():
        text = _SLOT.sub(lambda m: values[m.group(1)], (TEMPLATE_DIR / source).read_text(encoding="utf-8"))
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text(text, encoding="utf-8")
    return root
