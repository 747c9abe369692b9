"""Entry points: the `impetus` command (serve | pull | list | rm | bench) and Gunicorn's configuration."""

from gerdsen_ai_server.cli.commands import main

__all__ = ["main"]
