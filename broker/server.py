"""`jit serve`: the broker under gunicorn, the production WSGI server. Each worker process builds
its own app, so each has exactly one reaper, notifier, forwarder and dashboard counter (threads
of that process, whatever the worker and thread counts; each worker counts the dashboard's figures
once as it starts); the store's conditional claims keep several processes, and several
replicas, from doing the same work twice. On SIGTERM gunicorn stops accepting, lets requests in
flight finish (up to `[server] graceful_timeout`), then each worker stops its threads: the reaper
finishes the grant in hand and signs the last checkpoint, so nothing is left claimed."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from .config import Settings

# Where gunicorn's heartbeat file lives: the worker touches it on every turn of its loop, cheaper
# on a memory filesystem than on a disk's (gunicorn's own advice for containers).
WORKER_TMP_DIR = "/dev/shm"  # noqa: S108 - gunicorn makes its file there with mkstemp

# broker.metrics' name for it, not imported from there: prometheus-client reads this variable when
# it is first imported, so the master must set it before anything imports prometheus-client.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServerLogger(Logger):
    """gunicorn's own lines (workers starting, stopping, timing out) in the broker's log format,
    so a JSON log pipeline never meets a plain line."""

    log_format = "text"

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from . import logs

        for handler in self.error_log.handlers:
            logs.use_format(handler, self.log_format)


class BrokerServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        server = self.settings.server
        ServerLogger.log_format = server["log_format"]
        options: dict[str, Any] = {
            "bind": f"{server['host']}:{server['port']}",
            "workers": server["workers"],
            "threads": server["threads"],
            "worker_class": "gthread",
            "worker_tmp_dir": WORKER_TMP_DIR if os.path.isdir(WORKER_TMP_DIR) else None,
            "graceful_timeout": server["graceful_timeout"],
            "timeout": max(30, int(self.settings.vault["timeout"]) * 3),
            "keepalive": 5,
            # The API's limits (README): a header line up to 64 KiB, 100 headers; a request
            # line up to gunicorn's most, 8190 bytes. Beyond them gunicorn answers a 4xx itself.
            "limit_request_line": 8190,
            "limit_request_field_size": 64 * 1024,
            "limit_request_fields": 100,
            "accesslog": None,  # the app logs each request itself: web/request_ids.py
            "errorlog": "-",
            "logger_class": ServerLogger,
            "preload_app": False,  # the app, and its threads, are made in each worker
            "post_worker_init": _post_worker_init,
            "worker_exit": _worker_exit,
            "child_exit": _child_exit,
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        from . import create_app, logs
        from .web.request_ids import ACCESS_LOG

        logs.configure(self.settings.server["log_format"])
        app = create_app(self.settings)
        app.config[ACCESS_LOG] = True
        return app


def _post_worker_init(worker: Any) -> None:
    """create_app started the threads already; nothing more. Named for the log's sake."""
    worker.log.info("worker %s: reaper, notifier and forwarder running", worker.pid)


def _worker_exit(server: Any, worker: Any) -> None:
    """Stop this worker's threads (the reaper signs the last checkpoint) after its last request."""
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("jit") if app is not None else None
    if services is not None:
        services.stop()


def _child_exit(server: Any, worker: Any) -> None:
    """A dead worker's counters stay in the totals; its live gauges go (prometheus-client)."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT. With several worker processes, their metrics meet in a fresh
    directory (PROMETHEUS_MULTIPROC_DIR) removed at exit, so any worker answers /metrics for all."""
    shared = None
    if settings.server["workers"] > 1 and not os.environ.get(MULTIPROCESS_ENV):
        if "prometheus_client" in sys.modules:
            raise RuntimeError("prometheus-client was imported before its multiprocess dir was set")
        shared = tempfile.mkdtemp(prefix="jit-metrics-")
        os.environ[MULTIPROCESS_ENV] = shared
    try:
        BrokerServer(settings).run()
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
