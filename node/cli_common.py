"""What every ``preannot`` command shares: the --config option, loading it, errors, the node's stores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.config import NodeConfig, load_config
from node.errors import PreannotError

if TYPE_CHECKING:
    from node.service import Stores

__all__ = ["ConfigOpt", "die", "load_or_exit", "stores_or_exit"]

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="PREANNOT_CONFIG",
                                                help="TOML configuration file")]


def load_or_exit(config: Path | None) -> NodeConfig:
    try:
        return load_config(config)
    except PreannotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def die(exc: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def stores_or_exit(config: Path | None) -> Stores:
    """The node's state owners, for read and act commands: never creates a data folder."""
    from node.service import open_stores

    try:
        return open_stores(load_or_exit(config))
    except PreannotError as exc:
        raise die(exc, 2) from exc
