"""``dicomlake upload`` and ``dicomlake stream start|status|stop``."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def upload(paths: tuple[str, ...], as_json: bool) -> None:
    """Upload DICOM files or ZIP archives (each member) to the imageupload topic.

    Every file is confirmed by the broker; failures are listed and the exit code is 1.
    """
    from dicomlake.streaming.broker import BrokerError
    from dicomlake.streaming.producer import upload as run_upload

    try:
        results = run_upload(list(paths))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    failed = [r for r in results if not r.ok]
    for r in results:
        if as_json:
            click.echo(json.dumps(r.__dict__, sort_keys=True))
        elif not r.ok:
            click.echo(f"FAILED {r.name}: {r.error}", err=True)
    if not as_json:
        click.echo(f"uploaded {len(results) - len(failed)} of {len(results)} file(s)"
                   + (f"; {len(failed)} FAILED" if failed else ""))
    if failed:
        sys.exit(1)


@click.group()
def stream() -> None:
    """The streaming path: embedded Kafka broker + Flink job keeping tables fresh."""


@stream.command("start")
def start_cmd() -> None:
    """Start the broker (embedded unless configured), the topics and the Flink job."""
    from dicomlake.config import load_settings
    from dicomlake.streaming.runner import StreamError, start

    try:
        info = start(load_settings())
    except (StreamError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    state = "already running" if info["already_running"] else "started"
    click.echo(f"stream {state}: job pid {info['job_pid']}, Kafka at {info['bootstrap']}")


@stream.command("status")
def status_cmd() -> None:
    """Print broker/job state, committed offsets, lag and rows written (JSON)."""
    from dicomlake.config import load_settings
    from dicomlake.streaming.runner import status

    click.echo(json.dumps(status(load_settings()), indent=2, sort_keys=True))


@stream.command("stop")
def stop_cmd() -> None:
    """Stop the Flink job and the embedded broker."""
    from dicomlake.config import load_settings
    from dicomlake.streaming.runner import stop

    stopped = stop(load_settings())
    click.echo(f"stopped: job={'yes' if stopped['job'] else 'not running'}, "
               f"broker={'yes' if stopped['broker'] else 'not running'}")


COMMANDS = [upload, stream]
