"""The `edgekv` command line: its commands, and the one place that turns an EdgekvError into a one-line
error and exit status 1."""

from __future__ import annotations

import signal
import sys

import click

from edgekv.cli.artifacts import compile_command, export, install_rknn, profiles, validate
from edgekv.cli.common import console
from edgekv.cli.measure import bench, calibrate, evaluate
from edgekv.cli.run import chat, generate
from edgekv.cli.serve import serve
from edgekv.core.errors import EdgekvError


@click.group()
@click.version_option(package_name="edgekv")
def cli() -> None:
    """edgekv: unbounded-context LLMs on static-shape NPUs."""


for command in (profiles, export, validate, compile_command, install_rknn, generate, chat, serve, bench, calibrate,
                evaluate):
    cli.add_command(command)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM's default ends the process without unwinding, leaving an engine's session directory (and its
    # spill file) behind; an exit runs every close on the way out. `serve` installs its own handler.
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cli(standalone_mode=False)
    except EdgekvError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)

