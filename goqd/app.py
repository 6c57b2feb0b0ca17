"""Wiring: every channel, nursery and actor of ``goqd run`` is created here, and only here.

::

    root nursery (one_for_all: the ledger, control server or HTTP server failing
    stops the daemon and systemd restarts it)
      run_ledger                 the only writer of the SQLite file
      Imports.run_stock_imports  the nursery imports run in (goqd.control.imports)
      supervise(run_store) × N   one_for_one per store: restart with backoff, give up
                                 after intensity/period and mark the store ``down``
      serve_control              goqctl over the Unix socket, answered by the
                                 operator API (goqd.control.operator)
      serve_http                 /metrics, /healthz, webhooks
      run_watchdog               WATCHDOG=1 only while the ledger answers

``READY=1`` is sent only after every ``nursery.start`` above has returned. Whoever opens
a channel closes it: the ledger's send side belongs to this module.

What each control request does is ``goqd.control.operator``'s and what a reload changes
is ``goqd.reload``'s; this module only wires them to the daemon's state (``Daemon``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
import structlog
import trio
from prometheus_client import CollectorRegistry

import goqd
from goqd import messages as m
from goqd import systemd
from goqd.config import (
    Config,
    StoreConfig,
    check_host,
    control_group_ids,
    load_credentials,
)
from goqd.control import protocol as p
from goqd.control.operator import Operator
from goqd.control.server import WithProgress, serve_control
from goqd.errors import LEVEL_CREDENTIAL, LEVEL_TEMPORARY, LedgerError
from goqd.http import serve_http
from goqd.ledger import LedgerClient, Wakeups, open_ledger_channel, run_ledger
from goqd.malls.base import WebhookCheck
from goqd.malls.registry import MALLS
from goqd.metrics import Metrics
from goqd.reload import ReloadPlan, reload_config
from goqd.secret import Secret
from goqd.stores.actor import StoreHandle, run_store
from goqd.stores.credentials import CredentialKeeper
from goqd.supervisor import ChildSpec, supervise
from goqd.wallclock import WallClock

log = structlog.get_logger("goqd.app")

Webhook = Callable[[bytes, Mapping[str, str]], Awaitable[int]]


@dataclass
class Daemon:
    """A running daemon: its configuration, ledger client and store handles, as the
    operator API (``operator``), the HTTP server, tests and ``goqd demo`` see them.

    It answers health checks, refreshes the ledger-derived gauges and reloads the
    configuration; what each control request does is ``goqd.control.operator``'s.
    """

    config: Config
    ledger: LedgerClient
    handles: dict[str, StoreHandle]
    metrics: Metrics
    registry: CollectorRegistry
    clock: WallClock
    started_at: float
    http_url: str = ""
    transport: httpx.AsyncBaseTransport | None = None
    # The installed distribution's (pyproject.toml), shown by `goqctl status`.
    version: str = field(default_factory=lambda: goqd.__version__)
    # What the last reload found (``reload``): changed keys that wait for a restart, and
    # why the last reload was refused ("" once one succeeds).
    restart_needed: tuple[str, ...] = ()
    reload_error: str = ""
    _reload_lock: trio.Lock = field(default_factory=trio.Lock, repr=False)
    operator: Operator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.operator = Operator(self)

    async def store_infos(self) -> tuple[p.StoreInfo, ...]:
        """Every store's state, as ``goqctl stores`` shows it."""
        return await self.operator.store_infos()

    async def health(self) -> dict[str, object]:
        try:
            with trio.fail_after(5):
                await self.ledger.ask(m.Ping(), m.Pong)
        except (trio.TooSlowError, LedgerError):
            return {"ok": False, "ledger": "not answering"}
        return {
            "ok": True,
            "stores": {name: h.state for name, h in self.handles.items()},
        }

    async def ledger_alive(self) -> bool:
        return bool((await self.health())["ok"])

    async def update_gauges(self) -> None:
        """Refresh the ledger-derived gauges (outbox, parked lines, open errors by level,
        ledger inbox). Cheap: only the small per-store tables are counted."""
        stats = await self.ledger.ask(m.GetStoreStats(), m.StoreStats)
        per_store = {x.store: x for x in stats.stores}
        for name in self.handles:
            x = per_store.get(name)
            self.metrics.outbox_pending.labels(name).set(x.outbox if x else 0)
            self.metrics.parked_lines.labels(name).set(x.parked if x else 0)
            self.metrics.parked_listings.labels(name).set(x.parked_listings if x else 0)
            self.metrics.ambiguous_listings.labels(name).set(x.ambiguous_listings if x else 0)
            self.metrics.held_units.labels(name).set(x.held if x else 0)
            levels = dict(x.open_errors_by_level) if x else {}
            for level in {LEVEL_TEMPORARY, LEVEL_CREDENTIAL} | set(levels):
                self.metrics.errors_open.labels(name, str(level)).set(levels.get(level, 0))
        self.metrics.ledger_inbox_waiting.set(self.ledger.statistics().tasks_waiting_send)

    async def run_gauges(
        self,
        *,
        interval: float = 10.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            with contextlib.suppress(LedgerError):
                await self.update_gauges()
            await trio.sleep(interval)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> ReloadPlan | None:
        """Read the config file and every credential again and apply what may change
        live (``goqd.reload.reload_config``); None if the reload was refused."""
        return await reload_config(self, self._reload_lock)


async def serve_reload_signal(
    daemon: Daemon, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reload the configuration at every SIGHUP (``systemctl reload goqd``).

    Resource handling: holds trio's SIGHUP receiver from before ``started()`` (so from
    READY on a SIGHUP reloads and never ends the process) until cancelled, when the
    previous handler is put back. SIGHUPs that arrive during a reload make one more.

    Error handling: ``Daemon.reload`` answers every failure itself (logged, counted, shown
    by ``goqctl status``); nothing is raised here.
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("config_reload_requested", signal="SIGHUP")
            await daemon.reload()


async def run_daemon(
    config: Config,
    *,
    clock: WallClock = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
    credentials: Mapping[str, dict[str, Secret]] | None = None,
    rng: random.Random | None = None,
    wakeups: Wakeups | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled. ``started()`` gets the ``Daemon`` when READY.

    Credentials are read (and checked) before anything starts, so a missing or
    world-readable file refuses the start with the file's name. So are
    the control groups and the state directory (``check_host``): what ``goqd
    check-config`` refuses, this refuses, before READY and before creating anything.
    """
    check_host(config)
    creds = (
        dict(credentials)
        if credentials is not None
        else {s.name: load_credentials(config, s) for s in config.stores}
    )
    os.makedirs(config.daemon.state_dir, mode=0o750, exist_ok=True)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    ledger, inbox = open_ledger_channel()
    if wakeups is not None:
        # A tool's own policy for waking the stores' push loops (the benchmark's
        # poll-gated baseline); the daemon's is "as soon as the outbox changed".
        ledger.wakeups = wakeups
    daemon = Daemon(
        config=config,
        ledger=ledger,
        handles={},
        metrics=metrics,
        registry=registry,
        clock=clock,
        started_at=clock(),
        transport=transport,
    )
    for store in config.stores:
        metrics.touch_store(store.name, store.mall)
        metrics.touch_child(f"store:{store.name}")
        metrics.set_state(store.name, "running")
        metrics.store_up.labels(store.name, store.mall).set(1)
        handle = daemon.handles[store.name] = StoreHandle(
            name=store.name, mall=store.mall, credentials=creds[store.name]
        )
        handle.credential_keeper = CredentialKeeper(
            handle, directory=config.daemon.credentials_dir, ledger=ledger
        )
    rng = rng or random.Random()
    hooks: dict[str, Webhook] = {}
    for store in config.stores:
        check = MALLS[store.mall].webhook
        if check is not None:
            hooks[store.name] = _webhook_handler(daemon, store.name, check)
    async with trio.open_nursery() as root:
        await root.start(
            functools.partial(
                run_ledger,
                config.daemon.ledger_path,
                inbox,
                ledger.wakeups,
                synchronous=config.daemon.synchronous,
                now=clock,
                metrics=metrics,
            )
        )
        await root.start(daemon.operator.imports.run_stock_imports)
        # All at once: each store reads its cursor from the ledger before it is started;
        # one at a time, each read queued behind the polls of the stores already going.
        async with trio.open_nursery() as starting:
            for store in config.stores:
                starting.start_soon(root.start, _supervise_store, daemon, store, transport, rng)
        await root.start(
            functools.partial(
                serve_control,
                config.daemon.control_socket,
                WithProgress(daemon.operator.handle_control),
                allowed_uids=frozenset(),
                allowed_gids=_group_ids(config.daemon.control_groups),
                # The socket file belongs to the first group listed: the set above has
                # lost the order the administrator wrote.
                socket_gid=_first_group_id(config.daemon.control_groups),
            )
        )
        daemon.http_url = await root.start(
            functools.partial(
                serve_http,
                config.daemon.http_listen,
                registry,
                health=daemon.health,
                webhooks=hooks,
                allow_public=config.daemon.http_public,
            )
        )
        await root.start(daemon.run_gauges)
        # trio hears signals on the main thread only. A daemon run in a thread of its own
        # (tests/helpers/daemon_thread.py) is reloaded by calling Daemon.reload().
        if threading.current_thread() is threading.main_thread():
            await root.start(serve_reload_signal, daemon)
        interval = systemd.watchdog_interval()
        if interval:
            await root.start(
                functools.partial(systemd.run_watchdog, daemon.ledger_alive, interval=interval)
            )
        systemd.ready(f"{len(config.stores)} stores")
        log.info(
            "daemon_ready",
            stores=len(config.stores),
            http=daemon.http_url,
            control=config.daemon.control_socket,
        )
        task_status.started(daemon)
        try:
            await trio.sleep_forever()
        finally:
            systemd.stopping()
            root.cancel_scope.cancel()


WEBHOOK_WAIT_S = 20.0


def _webhook_handler(daemon: Daemon, store: str, check: WebhookCheck) -> Webhook:
    """``POST /webhooks/<store>``: verify the mall's signature, poll that store at once,
    and answer 200 only after a poll that started after the webhook arrived committed;
    503 as soon as that poll failed, or after ``WEBHOOK_WAIT_S`` (the mall redelivers).
    Polls that failed earlier do not count. A duplicate delivery just causes another
    poll, which books nothing twice."""

    async def handle(body: bytes, headers: Mapping[str, str]) -> int:
        handle = daemon.handles[store]
        verdict = check(handle.credentials, body, headers)
        if verdict is None:
            log.warning("webhook_rejected", store=store, reason="bad signature")
            return 401
        if not verdict:
            return 200  # not an order event: nothing to do
        with trio.move_on_after(WEBHOOK_WAIT_S):
            if await handle.poll_and_wait():
                return 200
        return 503

    return handle


async def _supervise_store(
    daemon: Daemon,
    store: StoreConfig,
    transport: httpx.AsyncBaseTransport | None,
    rng: random.Random,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    handle = daemon.handles[store.name]
    spec = MALLS[store.mall]

    def on_give_up(name: str, error: Exception) -> None:
        handle.set_state(
            "down", level=LEVEL_TEMPORARY, message=f"gave up after repeated crashes: {error!r}"
        )

    child = functools.partial(
        run_store,
        store,
        spec,
        handle,
        daemon.ledger,
        clock=daemon.clock,
        metrics=daemon.metrics,
        transport=transport,
        key_warning_days=daemon.config.daemon.key_warning_days,
        rng=random.Random(rng.random()),
        state_dir=daemon.config.daemon.state_dir,
    )
    await supervise(
        ChildSpec(name=f"store:{store.name}"),
        child,
        on_restart=daemon.metrics.count_restart,
        on_give_up=on_give_up,
        task_status=task_status,
    )


def _first_group_id(names: tuple[str, ...]) -> int | None:
    return min(control_group_ids(names[:1])) if names else None


def _group_ids(names: tuple[str, ...]) -> frozenset[int]:
    # A group this host lacks is refused (check_host did so before anything started; a
    # group removed since is refused too), never skipped: it would admit nobody.
    return control_group_ids(names)
