"""HTTP service: health, metrics, JSON API, dashboard."""

from node.web.app import create_app

__all__ = ["create_app"]
