"""``dicomlake upload`` and ``dicomlake stream start|status|stop``."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input.")
def upload(paths: tuple[str, ...], as_json: bool) -> None:
    """Upload DICOM files, folders or archives (ZIP, tar: each DICOM member) to the
    imageupload topic.

    Every image sent is confirmed by the broker. Inputs that are no image (not DICOM,
    skipped litter, damaged members, a DICOMDIR) are not sent; they are listed and counted.
    The exit code is 1 when the broker did not confirm an image.
    """
    from dicomlake.streaming.broker import BrokerError
    from dicomlake.streaming.producer import summarize
    from dicomlake.streaming.producer import upload as run_upload

    try:
        results = run_upload(list(paths))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in results:
        if as_json:
            click.echo(json.dumps(r.__dict__, sort_keys=True))
        elif r.rejected:
            click.echo(f"not sent {r.name}: {r.kind}: {r.error}", err=True)
        elif r.failed:
            click.echo(f"FAILED {r.name}: {r.error}", err=True)
    counts = summarize(results)
    if not as_json:
        kinds = ", ".join(f"{n} {k}" for k, n in counts["not_sent_kinds"].items())
        click.echo(f"uploaded {counts['sent']} of {counts['inputs']} input(s)"
                   + (f"; {counts['not_sent']} not sent ({kinds})" if kinds else "")
                   + (f"; {counts['failed']} FAILED" if counts["failed"] else ""))
    if counts["failed"]:
        sys.exit(1)


@click.group()
def stream() -> None:
    """The streaming path: embedded Kafka broker + Flink job keeping tables fresh."""


@stream.command("setup")
@click.option("--python", "python", default=None,
              help="Python 3.11 or 3.12 to build from [default: this one if it is such, else "
                   "python3.12 or python3.11 on PATH].")
def setup_cmd(python: str | None) -> None:
    """Build the Flink job's interpreter under the lake's home (apache-flink needs a venv of
    its own; `make` builds .venv-flink in a checkout instead)."""
    from dicomlake.config import load_settings
    from dicomlake.streaming.flink_env import FlinkEnvError, build

    try:
        path = build(load_settings().home, python, say=lambda text: click.echo(text, err=True))
    except FlinkEnvError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Flink interpreter ready: {path}; `dicomlake stream start` uses it")


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
