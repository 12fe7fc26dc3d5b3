"""The cio-outbox command line: each command is a thin wrapper over an Outbox or Worker call."""

from __future__ import annotations

import click

from cio_outbox.sandbox import sandbox_command


@click.group()
@click.version_option(package_name="cio-outbox")
def cli() -> None:
    """Durable outbox and worker for the Customer.io Data Pipelines API."""


cli.add_command(sandbox_command, name="sandbox")


def main() -> None:
    cli()
