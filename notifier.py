"""Wakes this process's waiting clients as requests end, from one Redis subscription per process.

Every append to a sink log is published on `eas:ended` (sink_log.py). One subscriber thread per API
process (a greenlet under gevent, which patches threading) listens there and sets the Event of each
client waiting for that request or service. So a thousand long-polls cost a thousand Events, not a
thousand blocked Redis connections (Redis's default `maxclients` is 10,000 across all API hosts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import redis

import keys
import redis_errors
from metrics import WAITING_CLIENTS

log = logging.getLogger("eas_queue")
T = TypeVar("T")


# Redis reads that waiting clients make at once, of the process's 32 connections (redis_connection.py):
# when many streams wake together, the rest of the API still finds connections free.
MAX_READERS = 8
GONE_CHECK = 1.0  # seconds between a waiting client's checks that it is still connected


class Busy(Exception):
    """This process already holds `max_clients` waiting clients."""


class EndedNotifier:
    """Long-polls wait here: `wait_until(ready, timeout, request_id=... or service=...)`, inside `client()`."""

    def __init__(self, connect: Callable[[], redis.Redis], max_clients: int = 500) -> None:
        # Waiting clients (long-polls, streams, Prefer: wait) this process holds at most: well under
        # gunicorn's worker_connections (server.py), so submits, the sink and /healthz always get a
        # connection; beyond it a waiting client gets 503 at once. A probe with 2,000 event streams
        # otherwise took every connection and /healthz stopped answering.
        self.max_clients = max_clients
        self._connect = connect
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._listening_pid: int | None = None
        self._clients = 0
        self._readers = threading.BoundedSemaphore(MAX_READERS)

    @contextlib.contextmanager
    def client(self) -> Iterator[None]:
        """A waiting client's whole stay; raises Busy when the process holds `max_clients` already."""
        release = self.admit()
        try:
            yield
        finally:
            release()

    def admit(self) -> Callable[[], None]:
        """Takes a place for a waiting client (Busy when none is left); returns its release, which gives the
        place back once however often it is called (a response may be closed twice)."""
        with self._lock:
            if self._clients >= self.max_clients:
                raise Busy(f"this server holds {self.max_clients} waiting clients already")
            self._clients += 1
        WAITING_CLIENTS.inc()  # the metric counts what max_clients caps
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._clients -= 1
                    WAITING_CLIENTS.dec()

        return release

    def _read(self, ready: Callable[[], T | None]) -> T | None:
        with self._readers:
            return ready()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Bounds the Redis reads waiting clients make at once (MAX_READERS)."""
        with self._readers:
            yield

    def wait_until(
        self,
        ready: Callable[[], T | None],
        timeout: float,
        *,
        request_id: str | None = None,
        service: str | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> T | None:
        """Calls `ready()` until it returns something other than None, waking when `request_id` (or any
        request of `service`) ends, for at most `timeout` seconds; returns that, or None if it was not ready
        in time. `gone()` is asked every GONE_CHECK seconds meanwhile: a client that has gone away gives its
        place back at once, not when its wait runs out (ready() is not called for that, nor when the wait
        runs out unwoken: an idle wait costs Redis nothing)."""
        self._listen()
        event = threading.Event()
        topics = [f"request:{request_id}"] if request_id else []
        topics += [f"service:{service}"] if service else []
        self._register(topics, event)
        try:
            deadline = time.monotonic() + timeout
            # Registered before this first check, so an end published between it and the wait still wakes us.
            value = self._read(ready)
            while value is None:
                left = deadline - time.monotonic()
                if left <= 0:  # read again only if woken meanwhile: an idle wait costs Redis nothing
                    return self._read(ready) if event.is_set() else None
                if event.wait(min(left, GONE_CHECK) if gone else left):
                    event.clear()
                    value = self._read(ready)
                elif gone is not None and gone():
                    return None
            return value
        finally:
            self._unregister(topics, event)

    def _register(self, topics: list[str], event: threading.Event) -> None:
        with self._lock:
            for topic in topics:
                self._waiters.setdefault(topic, set()).add(event)

    def _unregister(self, topics: list[str], event: threading.Event) -> None:
        with self._lock:
            for topic in topics:
                events = self._waiters.get(topic)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[topic]

    def _wake(self, topics: list[str] | None = None) -> None:
        """Wakes the clients waiting on `topics` (None: every waiting client)."""
        with self._lock:
            if topics is None:
                events = {event for waiting in self._waiters.values() for event in waiting}
            else:
                events = {event for topic in topics for event in self._waiters.get(topic, ())}
        for event in events:
            event.set()

    def _listen(self) -> None:
        """Starts the subscriber in this process on first use (after gunicorn forked its workers)."""
        if self._listening_pid == os.getpid():
            return
        with self._lock:
            if self._listening_pid != os.getpid():
                self._listening_pid = os.getpid()
                threading.Thread(target=self._subscribe_for_ever, name="ended-notifier", daemon=True).start()

    def _subscribe_for_ever(self) -> None:
        failures = 0
        while True:
            try:
                self._subscribe()
            except Exception as error:  # the thread must outlive anything: waiting clients depend on it
                failures += 1
                if isinstance(error, redis.RedisError):
                    log.warning("notifications of ended requests paused: %s", redis_errors.describe(error))
                else:
                    log.exception("notifications of ended requests paused")
                time.sleep(redis_errors.backoff(failures))

    def _subscribe(self) -> None:
        """Relays notifications until the subscription fails (then raises)."""
        pubsub = self._connect().pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.ENDED_CHANNEL)
            self._wake()  # ends published while no subscription was open: let every client look again
            while True:
                self._relay(pubsub.get_message(timeout=1.0))
        finally:
            pubsub.close()

    def _relay(self, message: dict | None) -> None:
        """A line `<service> <index> <request id>` per ended request, as lua/*.lua publish them (a worker's
        batch in one message)."""
        if message is not None:
            names: set[str] = set()
            for line in message["data"].decode("utf-8", "replace").split("\n"):
                service, _, rest = line.partition(" ")
                names.update((f"request:{rest.partition(' ')[2]}", f"service:{service}"))
            self._wake(list(names))
