"""Building the worker from the process environment: logging, the runpod SDK's log level, then the models."""

from __future__ import annotations

import logging
import sys

from .config import Settings
from .errors import ConfigError
from .worker import Worker, build_worker

log = logging.getLogger("qwen_worker")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # The SDK's own default is DEBUG, which logs every job's whole output (base64 images included).
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(settings.runpod_log_level)


def create_worker() -> Worker:
    """Read the environment, load the models and return a ready worker; exit with a clear message if misconfigured."""
    try:
        settings = Settings.from_env()
        configure_logging(settings)
        return build_worker(settings)
    except ConfigError as err:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        log.error("the worker cannot start: %s", err)
        raise SystemExit(f"qwen-worker cannot start: {err}") from None
