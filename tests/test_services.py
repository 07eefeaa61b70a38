"""broker/services.py: the broker's parts built from the settings in one place, and their
background threads (reaper, audit forwarder, notifier) started and stopped together, once."""

from __future__ import annotations

from broker.services import Services
from tests.helpers import HttpReceiver

THREADS = {"jit-reaper", "jit-forward", "jit-notify"}


def running(services: Services) -> set[str]:
    """The names of the services' own threads that are alive now."""
    threads = (services.reaper._thread, services.forwarder._thread, services.notifier._thread)
    return {thread.name for thread in threads if thread is not None and thread.is_alive()}


def test_start_runs_every_thread_and_stop_ends_them_all_once(make_app):
    receiver = HttpReceiver()
    try:
        app = make_app(
            reaper={"enabled": True},
            notify={"webhook_url": receiver.url},
            audit={"forward_url": receiver.url},
        )
        services = app.extensions["jit"]
        assert running(services) == THREADS  # create_app started them

        services.start()  # a second start starts nothing more
        assert running(services) == THREADS

        services.stop()
        assert running(services) == set()
        services.stop()  # a second stop does nothing
        services.start()  # nor does a start after the stop
        assert running(services) == set()
    finally:
        receiver.stop()


def test_a_broker_without_urls_or_reaper_runs_no_thread(make_app):
    services = make_app().extensions["jit"]  # make_app switches the reaper off

    assert running(services) == set()
    services.stop()
    assert running(services) == set()
