"""What every ``preannot`` command shares: the --config option, loading it, errors, the node's stores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.config import NodeConfig, Route, load_config
from node.errors import PreannotError

if TYPE_CHECKING:
    from node.service import Stores

__all__ = ["ConfigOpt", "RouteOpt", "die", "load_or_exit", "route_for", "stores_or_exit"]

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="PREANNOT_CONFIG",
                                                help="TOML configuration file")]


RouteOpt = Annotated[str | None, typer.Option("--route", help="Apply this configured route's options (finding "
                                              "selection, extra outputs); default: the one route naming the "
                                              "model, if there is exactly one")]


def route_for(cfg: NodeConfig, model: str, name: str | None) -> Route | None:
    """The configured route whose options ``run`` and ``evaluate`` apply, as the node would: the one named
    (exit 2 when there is none), else the only route naming the model, else none."""
    if name is not None:
        route = next((r for r in cfg.routes if r.name == name), None)
        if route is None:
            raise die(PreannotError(f"no route {name!r} in {cfg.source}; routes: {[r.name for r in cfg.routes]}"), 2)
        return route
    naming = [r for r in cfg.routes if model in r.models]
    return naming[0] if len(naming) == 1 else None


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
