"""The commands that talk to a Ray cluster's job server: submit, status, logs, stop, jobs
(through ``rayinfer.submit``, which imports Ray's client only when called)."""

from __future__ import annotations

import sys

import click

from rayinfer.cli.options import address_option, set_option


@click.command()
@click.argument("job", type=click.Path(dir_okay=False, exists=True))
@set_option
@address_option
@click.option("--working-dir", default=".", show_default=True, help="Uploaded for the job ('' to upload nothing).")
@click.option("--pip", "pip", multiple=True, metavar="REQ", help="Extra packages for the job, e.g. a task plugin (repeatable).")
@click.option("--id", "submission_id", default=None, help="Submission id (default: one Ray makes up).")
@click.option("--wait", is_flag=True, help="Follow the job's log to the end and exit with its status.")
def submit(job: str, overrides: tuple[str, ...], address: str, working_dir: str, pip: tuple[str, ...],
           submission_id: str | None, wait: bool) -> None:
    """Submit JOB to a Ray cluster through the Ray Jobs API; print the submission id."""
    from rayinfer import submit as jobs

    sid = jobs.submit(job, list(overrides), address, working_dir or None, list(pip), submission_id)
    click.echo(sid)
    if wait:
        state = jobs.follow(address, sid, lambda text: click.echo(text, nl=False, err=True))
        click.echo(f"rayinfer: job {sid} {state}", err=True)
        sys.exit(jobs.wait_exit_code(state))


@click.command()
@click.argument("submission_id")
@address_option
def status(submission_id: str, address: str) -> None:
    """Show a submitted job's status."""
    from rayinfer import submit as jobs

    info = jobs.status(address, submission_id)
    click.echo(f"{info['submission_id']}  {info['status']}  {info['message'] or ''}".rstrip())


@click.command()
@click.argument("submission_id")
@address_option
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
def logs(submission_id: str, address: str, follow: bool) -> None:
    """Print a submitted job's log."""
    from rayinfer import submit as jobs

    if follow:
        jobs.follow(address, submission_id, lambda text: click.echo(text, nl=False))
    else:
        click.echo(jobs.logs(address, submission_id), nl=False)


@click.command()
@click.argument("submission_id")
@address_option
def stop(submission_id: str, address: str) -> None:
    """Stop a submitted job (its committed parts stay: resubmit with output.mode=resume)."""
    from rayinfer import submit as jobs

    stopped = jobs.stop(address, submission_id)
    click.echo(f"{submission_id}: {'stop requested' if stopped else 'not running'}")


@click.command("jobs")
@address_option
def list_jobs(address: str) -> None:
    """List the jobs submitted to the cluster."""
    from rayinfer import submit as jobs

    for j in jobs.list_jobs(address):
        click.echo(f"{j['submission_id']}  {j['status']}  {j['task']}")


CLUSTER_COMMANDS = [submit, status, logs, stop, list_jobs]
