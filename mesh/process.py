"""What every process's main() does: settings from the environment, logging, stop signals,
then its serve() until SIGINT/SIGTERM. Also the version every server reports, and the bounded,
logged shutdown step every process's shutdown is made of."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic_settings import BaseSettings

from mesh import logs
from mesh.metrics import Metrics
from mesh.rpc.server import install_stop_signals
from mesh.settings import CommonSettings

S = TypeVar("S", bound=BaseSettings)

log = logging.getLogger(__name__)

STEP_S = 5.0  # default bound of one shutdown step

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
        metrics = Metrics(service=name, model_labels=common.metrics_model_labels,
                          model_label_limit=common.metrics_model_label_limit,
                          tenant_labels=common.metrics_tenant_labels)
        await serve(common, settings, stop, metrics)

    asyncio.run(main())


async def first_set(*events: asyncio.Event) -> None:
    """Returns once any of `events` is set (e.g. stop or drain)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def shutdown_step(what: str, aw: Awaitable[object], timeout_s: float = STEP_S) -> bool:
    """One step of a shutdown, bounded by `timeout_s`; a failure or a timeout is logged (with
    what it was) and the shutdown goes on with its next step. True when the step succeeded.

    Steps are awaited one by one, each on its own: one failing never skips the next (a failed
    health update must not skip stopping the server, nor a slow server stop the lease revoke).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await aw
        return True
    except TimeoutError:
        log.error("shutdown: %s took longer than %.1fs; going on", what, timeout_s)
    except Exception:
        log.exception("shutdown: %s failed; going on", what)
    return False
