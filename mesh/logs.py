"""Logging set-up: one format for every process, the level from settings."""

from __future__ import annotations

import logging


def setup(level: str, process: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)
