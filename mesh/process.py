"""What every process's main() does: settings from the environment, logging, stop signals,
then its serve() until SIGINT/SIGTERM. Also the version every server reports."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic_settings import BaseSettings

from mesh import logs
from mesh.metrics import Metrics
from mesh.rpc.server import install_stop_signals
from mesh.settings import CommonSettings

S = TypeVar("S", bound=BaseSettings)

# The V2 platform string every meshserve server reports for its models.
PLATFORM = "onnxruntime_onnx"


def version() -> str:
    try:
        return importlib.metadata.version("meshserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def run(
    name: str,
    settings_cls: type[S],
    serve: Callable[[CommonSettings, S, asyncio.Event, Metrics], Awaitable[None]],
) -> None:
    common = CommonSettings()
    settings = settings_cls()
    logs.setup(common.log_level, name)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await serve(common, settings, stop, Metrics(service=name))

    asyncio.run(main())
