"""The shared reliability rig: simulated malls for several stores, their config and
0600 credential files, a ledger with a linked catalogue, and a daemon run one of two ways.

* **In process** (``open_daemon``): ``run_daemon`` in the test's own trio run. With
  ``SimRouter`` as the daemon's HTTP transport the simulators are called in-process
  (no sockets), which together with ``inline_threads`` (the ledger's worker thread runs
  inline) and ``MockClock(autojump_threshold=0)`` makes a whole scenario deterministic
  for a seed: see ``tests/integration/test_reliability_faults.py``. Without the router the
  simulators are served over loopback by hypercorn (``serve_fleet``).
* **As a real process** (``DaemonProcess``): ``python -m goqd.cli.goqd run --config FILE``
  in a subprocess with its own TOML file; the simulators stay in the test process,
  served over loopback, so killing the daemon (SIGKILL, a crash point, SIGTERM) never
  loses the malls' state, and the checker reads both afterwards.

Every listing's ``set_history`` is replaced by a ``TimedHistory`` that records when each
value was applied (for the time bound of "no stale overwrite" and the propagation delays
of "isolation": I4 and I5 in docs/reliability.md "Invariants").

Entry points: ``run_dst(body)`` (one deterministic in-process scenario written as an async
function), ``run_scenario(Scenario(seed))`` (market + seeded fault plan + settle + checker),
``open_process_rig`` (fleet on loopback + config + ledger for a ``DaemonProcess``), and
``python -m tests.helpers.rig SEED... | --budget S --start N`` (seeds in a fresh process;
``PYTHONHASHSEED=0`` makes a seed replay bit for bit).

Why not autojump with the real ledger thread and real sockets: while the ledger's worker
thread commits, or bytes sit in a socket, every trio task looks blocked, so a
``MockClock(autojump_threshold=0)`` jumps to the next deadline (a poll timer, an httpx
timeout) in the middle of the work; runs are then neither deterministic nor faithful.
``inline_threads`` + ``SimRouter`` remove both. trio breaks ties between equal
deadlines by ``id()``, which differs between processes (ASLR); ``ordered_deadlines``
breaks them by registration order instead. Tasks woken together may be woken in address
order too; ``deterministic_scheduling`` runs every batch in a seeded order whatever the
wake order. With ``PYTHONHASHSEED=0`` a seed replays exactly in a fresh process (tested).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from goqd import messages as m
from goqd.app import Daemon, run_daemon
from goqd.config import Config, StoreConfig
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import ControlError, LedgerError
from goqd.ledger import open_db, open_ledger, queries
from goqd.sim.base import SimMall
from goqd.sim.http import App
from goqd.sim.market import Market
from goqd.sim.registry import SIMS
from goqd.tools import fleet as simfleet
from goqd.tools.fleet import write_credentials
from goqd.wallclock import WallClock
from tests.helpers.checker import StateChange
from tests.helpers.paths import ROOT

# The simulated wall clock's zero: 2026-09-21T… UTC. Under a MockClock the wall clock is
# EPOCH + trio.current_time(), so order times, windows and key expiry all follow it.
EPOCH = 1_790_000_000.0

CATALOGUE: dict[str, int] = {
    "TS-RED-S": 12,
    "TS-RED-M": 6,
    "MUG-WHT": 3,
    "TEA-SEN": 20,
    "CAP-NVY": 1,
}


def mock_wall_clock() -> float:
    return EPOCH + trio.current_time()


class TimedHistory(list[int]):
    """``SimListing.set_history`` that also records the wall time of every value."""

    def __init__(self, clock: WallClock, values: Sequence[int] = ()) -> None:
        super().__init__(values)
        self.clock = clock
        self.times: list[float] = [clock()] * len(values)

    def append(self, value: int) -> None:
        super().append(value)
        self.times.append(self.clock())


@dataclass
class Fleet:
    """Simulated malls, one per store, with the same catalogue listed in every store."""

    sims: dict[str, SimMall]
    malls: dict[str, str]  # store -> mall
    keys: dict[str, dict[str, str]]  # store -> sku -> listing key
    initial: dict[str, int]
    clock: WallClock

    def market(self, rng: random.Random, hot: Sequence[str] = ()) -> Market:
        return Market(
            sims=self.sims, keys=self.keys, real=dict(self.initial), rng=rng, hot=list(hot)
        )

    def stock(self, store: str, sku: str) -> int | None:
        return self.sims[store].stock(self.keys[store][sku])


def build_fleet(
    stores: Sequence[tuple[str, str]],
    *,
    clock: WallClock,
    seed: int = 0,
    catalogue: Mapping[str, int] = CATALOGUE,
    sim_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Fleet:
    """One simulator per (store, mall), every SKU listed at its initial stock."""
    rng = random.Random(seed)
    sims = simfleet.make_sims(
        stores,
        clock=clock,
        seeds=[rng.randrange(1 << 30) for _ in stores],
        first_shop=500000,
        options=sim_options,
    )
    keys: dict[str, dict[str, str]] = {}
    for store, mall in stores:
        spec = SIMS[mall]
        sim = sims[store]
        keys[store] = {}
        for sku, qty in catalogue.items():
            listing = spec.add(sim, spec.listing_key(sku), sku, f"商品 {sku}", qty)
            listing.set_history = TimedHistory(clock)
            keys[store][sku] = listing.listing_key
    return Fleet(sims, dict(stores), keys, dict(catalogue), clock)


class SimRouter(httpx.AsyncBaseTransport):
    """An httpx transport that hands each request to the simulator named by its host.

    No sockets: the request goes straight into the simulator's ASGI app in the caller's
    task, so under a MockClock nothing happens outside trio's view. The client's read
    timeout is honoured with ``trio.move_on_after`` (a simulator that sleeps past it —
    ``faults.latency``, ``timeout_after_apply`` — is cancelled, as a dropped connection
    would leave it) and raised as ``httpx.ReadTimeout``.
    """

    def __init__(self, apps: Mapping[str, App]) -> None:
        self.apps = dict(apps)
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        app = self.apps.get(request.url.host)
        if app is None:
            raise httpx.ConnectError(f"no simulator at {request.url.host}", request=request)
        self.calls += 1
        body = await request.aread()
        scope = {
            "type": "http",
            "method": request.method,
            "path": request.url.path,
            "query_string": request.url.query,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await trio.sleep_forever()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        timeouts = request.extensions.get("timeout", {})
        limit = timeouts.get("read") or timeouts.get("pool") or 30.0
        with trio.move_on_after(limit) as scope_:
            await app(scope, receive, send)
        if scope_.cancelled_caught:
            raise httpx.ReadTimeout("simulated read timeout", request=request)
        return httpx.Response(
            start["status"],
            headers=[(k, v) for k, v in start.get("headers", [])],
            content=b"".join(chunks),
            request=request,
        )


def router_url(store: str) -> str:
    return f"http://{store}.sim.invalid"


def router_for(fleet: Fleet) -> tuple[SimRouter, dict[str, str]]:
    apps = {f"{store}.sim.invalid": sim.app for store, sim in fleet.sims.items()}
    return SimRouter(apps), {store: router_url(store) for store in fleet.sims}


async def serve_fleet(nursery: trio.Nursery, fleet: Fleet) -> dict[str, str]:
    """Serve every simulator on loopback; return store -> base URL."""
    return await simfleet.serve_sims(nursery, fleet.sims)


async def serve_store(
    nursery: trio.Nursery, tmp: str, name: str, sim: SimMall, **store_kw: Any
) -> StoreConfig:
    """Serve ``sim`` on loopback and configure store ``name`` for it (its credential
    file 0600 under ``tmp``)."""
    url = (await simfleet.serve_sims(nursery, {name: sim}))[name]
    cred = write_credentials(os.path.join(tmp, f"{name}.json"), sim.credentials())
    return simfleet.store_config(name, sim.mall, url, credentials=cred, **store_kw)


def loopback_config(tmp: str, stores: Sequence[StoreConfig], **daemon_kw: Any) -> Config:
    """A daemon config under ``tmp`` (state, control socket) with its HTTP server on a
    free loopback port."""
    return simfleet.daemon_config(tmp, stores, **daemon_kw)


def make_config(
    tmp: str,
    fleet: Fleet,
    urls: Mapping[str, str],
    *,
    poll_interval: str = "60s",
    push_retry: str = "5s",
    request_timeout: str = "10s",
    synchronous: str = "full",
    log_level: str = "info",
    http_listen: str = "127.0.0.1:0",
    store_options: Mapping[str, Mapping[str, Any]] | None = None,
    watch_interval: str = "10s",
) -> Config:
    """The daemon's config with credential files (0600) under ``tmp/etc``."""
    return simfleet.Fleet(fleet.sims, dict(urls)).config(
        tmp,
        per_store={
            store: {"options": (store_options or {}).get(mall, {})}
            for store, mall in fleet.malls.items()
        },
        poll_interval=poll_interval,
        push_retry=push_retry,
        request_timeout=request_timeout,
        watch_interval=watch_interval,
        daemon={
            "http_listen": http_listen,
            "log_level": log_level,
            "log_format": "json",
            "synchronous": synchronous,
        },
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def write_toml(config: Config, path: str | None = None) -> str:
    """Write ``config`` as the TOML an operator would (kebab-case keys)."""
    path = path or config.source
    lines = ["[daemon]"]
    d = config.daemon
    for key in (
        "state_dir",
        "control_socket",
        "http_listen",
        "log_level",
        "log_format",
        "synchronous",
        "stop_timeout",
    ):
        lines.append(f"{key.replace('_', '-')} = {_toml_value(getattr(d, key))}")
    lines.append(f"control-groups = {_toml_value(list(d.control_groups))}")
    for s in config.stores:
        lines.append("")
        lines.append("[[stores]]")
        for key in (
            "name",
            "mall",
            "base_url",
            "credentials",
            "poll_interval",
            "push_retry",
            "request_timeout",
        ):
            lines.append(f"{key.replace('_', '-')} = {_toml_value(getattr(s, key))}")
        if s.urls:
            lines.append(f"urls = {_toml_value(dict(s.urls))}")
        if s.options:
            lines.append(f"options = {_toml_value(dict(s.options))}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def seed_catalogue(
    call_ledger: Callable[[m.LedgerRequest], Any], fleet: Fleet, *, base: str = ""
) -> None:
    """Products at their initial totals, every store's listing linked (queues pushes).

    ``base`` is the store the products count as imported from. It is empty by default:
    the ledger books a base-store sale older than the product as already reflected in
    the imported count ("before_import"), and the harness's markets start right after
    the import; ``test_reliability_inputs`` tests that rule on its own.
    """
    for sku, qty in fleet.initial.items():
        await call_ledger(m.UpsertProduct(sku=sku, name=f"商品 {sku}", total=qty, store=base))
    for store in fleet.sims:
        for sku, key in fleet.keys[store].items():
            await call_ledger(m.UpsertListing(store=store, listing_key=key, link_code=sku, sku=sku))


async def seed_ledger_file(path: str, fleet: Fleet) -> None:
    """Create the ledger file with the catalogue, before a daemon process opens it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    async with open_ledger(path) as ledger:
        await seed_catalogue(ledger.call, fleet)


@contextlib.contextmanager
def inline_threads() -> Iterator[None]:
    """Run ``trio.to_thread.run_sync`` inline on the trio thread.

    The ledger's SQLite work then happens inside trio's view: with a MockClock and
    autojump, time only jumps when every task (the ledger included) is really idle.
    """
    original = trio.to_thread.run_sync

    async def run_inline(fn: Callable[..., Any], *args: Any, **_kw: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    trio.to_thread.run_sync = run_inline  # type: ignore[assignment]
    try:
        yield
    finally:
        trio.to_thread.run_sync = original  # type: ignore[assignment]


@contextlib.contextmanager
def ordered_deadlines() -> Iterator[None]:
    """Break ties between equal trio deadlines by registration order, not by ``id()``.

    trio keeps deadlines in a heap of ``(deadline, id(cancel_scope), scope)``: two tasks
    sleeping until the same virtual instant wake in address order, and addresses differ
    from process to process (ASLR places pymalloc's arenas at random), so a seed could
    replay differently now and then. A counter makes the order a function of the seed.
    """
    import heapq
    import itertools

    from trio._core import _run

    counter = itertools.count()
    original = _run.Deadlines.add

    def add(self: Any, deadline: float, cancel_scope: Any) -> None:
        heapq.heappush(self._heap, (deadline, next(counter), cancel_scope))
        self._active += 1

    _run.Deadlines.add = add  # type: ignore[method-assign]
    try:
        yield
    finally:
        _run.Deadlines.add = original  # type: ignore[method-assign]


@contextlib.contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make the order in which trio runs each batch of runnable tasks a function of
    ``seed`` alone.

    trio runs a batch in the order its tasks were woken (or reversed), and some are
    woken by iterating a set of tasks hashed by address: cancelling a scope wakes its
    tasks in address order (``goqctl key set`` cancels a store's four loops at once),
    and addresses differ from process to process. With the wake order shuffled, a seed's
    fingerprint changed every time. In this mode (trio's own, which Hypothesis switches
    on when it is imported, so pytest runs had it and ``python -m tests.helpers.rig``
    did not) each batch is sorted by task creation order, then shuffled with trio's
    seeded generator.
    """
    from trio._core import _run

    flag = _run._ALLOW_DETERMINISTIC_SCHEDULING
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(seed)
    try:
        yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]


@dataclass
class Running:
    daemon: Daemon
    fleet: Fleet
    config: Config
    states: list[StateChange] = field(default_factory=list)

    @property
    def ledger_path(self) -> str:
        return self.config.daemon.ledger_path

    @property
    def socket(self) -> str:
        return self.config.daemon.control_socket

    def poll_all(self) -> None:
        for handle in self.daemon.handles.values():
            handle.request_poll()

    async def totals(self) -> dict[str, int]:
        products = await self.daemon.ledger.ask(m.ListProducts(limit=10_000), m.ProductList)
        return {x.sku: x.total for x in products.products}

    def metrics_text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.daemon.registry).decode()


async def _watch_states(run: Running, clock: WallClock) -> None:
    """Record every state change of every store (evidence for visibility, I6)."""

    async def watch(name: str) -> None:
        handle = run.daemon.handles[name]
        while True:
            run.states.append(StateChange(clock(), name, handle.state, handle.error_level))
            await handle.changed.wait()

    async with trio.open_nursery() as nursery:
        for name in run.daemon.handles:
            nursery.start_soon(watch, name)


@contextlib.asynccontextmanager
async def open_daemon(
    fleet: Fleet,
    tmp: str,
    urls: Mapping[str, str],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: WallClock,
    seed: int = 0,
    seed_ledger: bool = True,
    **config_kw: Any,
) -> AsyncIterator[Running]:
    """``run_daemon`` in this trio run, with the fleet's catalogue in its ledger."""
    config = make_config(tmp, fleet, urls, **config_kw)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            lambda task_status: run_daemon(
                config,
                clock=clock,
                transport=transport,
                rng=random.Random(seed),
                task_status=task_status,
            )
        )
        run = Running(daemon, fleet, config)
        nursery.start_soon(_watch_states, run, clock)
        if seed_ledger:
            await seed_catalogue(daemon.ledger.call, fleet)
        yield run
        nursery.cancel_scope.cancel()


async def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a test helper; the bound is the point
    every: float = 0.05,
    what: str = "",
) -> None:
    """Wait until ``check()`` (sync or async) is true, at most ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what or check}")


def ledger_consistent(path: str) -> None:
    """What must hold right after any crash, before a restart: the file opens, passes
    ``PRAGMA quick_check`` and conserves stock (no half-applied transaction): each SKU's
    movements add up to its total, each booked line's to its booked quantity."""
    # Opened as the daemon opens it (not read-only): a crash may have left a WAL to
    # recover, and open_db runs SQLite's quick_check, refusing a damaged file.
    conn = open_db(path)
    try:
        moved: dict[str, int] = {}
        by_line: dict[tuple[str, str, str], int] = {}
        for mv in queries.movements(conn):
            moved[mv.sku] = moved.get(mv.sku, 0) + mv.delta
            if mv.cause in ("order", "cancel", "correction"):
                ident = (mv.store, mv.order_id, mv.line_id)
                by_line[ident] = by_line.get(ident, 0) + mv.delta
        for product in queries.products(conn):
            sku, total = product.sku, product.total
            assert moved.get(sku, 0) == total, f"{sku}: movements {moved.get(sku)} != {total}"
        for line in queries.order_lines(conn):
            got = by_line.get((line.store, line.order_id, line.line_id), 0)
            assert got == -line.booked_qty, (
                f"{line.store}/{line.order_id}/{line.line_id}: moved {got}, "
                f"booked {line.booked_qty}"
            )
    finally:
        conn.close()


def converged(fleet: Fleet, path: str, *, stores: Sequence[str] | None = None) -> bool:
    """Outbox empty, every mall line booked at the mall's latest quantity (0 if
    cancelled) or parked, every linked listing at max(0, total)."""
    try:
        with queries.open_read_only(path) as conn:
            totals = queries.totals(conn)
            outbox = len(queries.outbox(conn))
            booked = {
                (r.store, r.order_id, r.line_id): r.booked_qty for r in queries.order_lines(conn)
            }
            parked = {(r.store, r.order_id, r.line_id) for r in queries.parked_lines(conn)}
    except (sqlite3.Error, LedgerError):
        return False  # not created yet
    if outbox:
        return False
    for store in stores or fleet.sims:
        sim = fleet.sims[store]
        for order in sim.orders.values():
            for line in order.lines:
                want = 0 if (order.cancelled or line.cancelled) else line.quantity
                ident = (store, order.order_id, line.line_id)
                if ident in parked:
                    continue
                if booked.get(ident, 0) != want:
                    return False
        for sku, key in fleet.keys[store].items():
            if sim.stock(key) != max(0, totals.get(sku, 0)):
                return False
    return True


@dataclass
class InFlight:
    now: int = 0
    at_peak: int = 0
    pushes: int = 0  # stock updates that entered the simulator


def track_in_flight(sim: SimMall) -> InFlight:
    """Count requests a simulator is still working on (its answer not yet sent)."""
    from tests.helpers.faults import PUSH_APIS

    stats = InFlight()
    app: Any = sim.app
    inner = app._handler
    push_apis = PUSH_APIS.get(sim.mall, frozenset())

    async def tracked(request: Any) -> Any:
        stats.now += 1
        stats.at_peak = max(stats.at_peak, stats.now)
        if sim.api_name(request) in push_apis:
            stats.pushes += 1
        try:
            return await inner(request)
        finally:
            stats.now -= 1

    app._handler = tracked
    return stats


# ---------------------------------------------------------------------- real process


class DaemonProcess:
    """``python -m goqd.cli.goqd run --config FILE`` as a child process.

    stdout (the JSON log lines) and stderr go to ``log_path``, appended across
    restarts, so a test can grep every line the daemon ever wrote.
    """

    def __init__(self, config_path: str, socket: str, log_path: str) -> None:
        self.config_path = config_path
        self.socket = socket
        self.log_path = log_path
        self.proc: trio.Process | None = None
        self.starts = 0

    async def start(self, *, crashpoint: str = "", env: Mapping[str, str] | None = None) -> None:
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        environ.pop("GOQD_CRASHPOINT", None)
        environ.pop("NOTIFY_SOCKET", None)
        if crashpoint:
            environ["GOQD_CRASHPOINT"] = crashpoint
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "goqd.cli.goqd", "run", "--config", self.config_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=str(ROOT),
            )
        finally:
            log.close()
        self.starts += 1

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until the control socket answers ``status`` (READY is sent just before)."""
        with trio.move_on_after(timeout):
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(
                        f"goqd exited with {self.proc.returncode} before it was ready:\n"
                        + self.log_tail()
                    )
                try:
                    await call(self.socket, p.Status(), timeout=2.0)
                    return
                except ControlError:
                    await trio.sleep(0.05)
        raise AssertionError("goqd did not become ready:\n" + self.log_tail())

    async def request(self, req: p.ControlRequest, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        return await call(self.socket, req, timeout=timeout)

    async def poll_now(self, stores: Sequence[str]) -> None:
        for store in stores:
            with contextlib.suppress(ControlError):
                await self.request(p.PollNow(store=store), timeout=3.0)

    async def wait_exit(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        with trio.fail_after(timeout):
            return await self.proc.wait()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    async def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return await self.wait_exit()

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        self.signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@dataclass
class ProcessRig:
    """Simulators served on loopback by this process, a real daemon process beside them."""

    fleet: Fleet
    config: Config
    config_path: str
    daemon: DaemonProcess
    tmp: str

    @property
    def ledger_path(self) -> str:
        return self.config.daemon.ledger_path

    @property
    def stores(self) -> list[str]:
        return list(self.fleet.sims)

    async def settle(self, timeout: float = 60.0, every: float = 1.0) -> None:  # noqa: ASYNC109
        """Poll every store now and then until everything converged."""
        with trio.move_on_after(timeout):
            while True:
                if converged(self.fleet, self.ledger_path):
                    return
                await self.daemon.poll_now(self.stores)
                for _ in range(int(every / 0.1)):
                    await trio.sleep(0.1)
                    if converged(self.fleet, self.ledger_path):
                        return
        raise AssertionError("the daemon did not converge:\n" + self.daemon.log_tail())


@contextlib.asynccontextmanager
async def open_process_rig(
    stores: Sequence[tuple[str, str]],
    tmp: str,
    *,
    catalogue: Mapping[str, int] = CATALOGUE,
    seed: int = 0,
    sim_options: Mapping[str, Mapping[str, Any]] | None = None,
    **config_kw: Any,
) -> AsyncIterator[ProcessRig]:
    """Serve a fleet on loopback, write the TOML and credentials, seed the ledger file.

    The daemon is not started: the test starts (and kills) it.
    """
    import time as _time

    fleet = build_fleet(
        stores, clock=_time.time, seed=seed, catalogue=catalogue, sim_options=sim_options
    )
    async with trio.open_nursery() as nursery:
        urls = await serve_fleet(nursery, fleet)
        config_kw.setdefault("poll_interval", "60s")
        config_kw.setdefault("push_retry", "2s")
        config_kw.setdefault("request_timeout", "5s")
        config = make_config(tmp, fleet, urls, **config_kw)
        path = write_toml(config)
        await seed_ledger_file(config.daemon.ledger_path, fleet)
        daemon = DaemonProcess(path, config.daemon.control_socket, os.path.join(tmp, "goqd.log"))
        rig = ProcessRig(fleet, config, path, daemon, tmp)
        try:
            yield rig
        finally:
            if daemon.running:
                with trio.CancelScope(shield=True):
                    await daemon.kill()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- deterministic runs

DEFAULT_STORES: tuple[tuple[str, str], ...] = (
    ("ra", "rakuten"),
    ("rb", "rakuten"),
    ("ya", "yahoo"),
    ("au", "aupay"),
    ("sh", "shopify"),
    ("am", "amazon"),
)


@dataclass
class Scenario:
    """One deterministic run: a market over the fleet, a fault plan, then settling."""

    seed: int
    stores: Sequence[tuple[str, str]] = DEFAULT_STORES
    catalogue: Mapping[str, int] = field(
        default_factory=lambda: {k: v * 4 for k, v in CATALOGUE.items()}
    )
    market_seconds: float = 1200.0
    order_interval: float = 5.0  # mean virtual seconds between orders
    cancel_rate: float = 0.08
    advance_rate: float = 0.2
    edit_rate: float = 0.05
    restock_rate: float = 0.03  # operator `stock adjust` over the control socket
    plan: Any = None  # a tests.helpers.faults.FaultPlan; None draws one from the seed
    fault_kinds: Sequence[str] | None = None
    healthy: Sequence[str] = ()
    poll_interval: str = "60s"
    push_retry: str = "10s"
    request_timeout: str = "10s"
    watch_interval: str = "10s"  # "0s": no sale watch, goqd as it runs without one
    settle_limit: float = 1800.0


@dataclass
class Outcome:
    seed: int
    report: Any  # CheckReport
    plan: Any  # FaultPlan
    records: list[Any]
    orders: int
    lines: int
    restocks: int
    edits: int
    settled_after: float | None  # virtual seconds from the end of faults to convergence
    fingerprint: str
    injected: dict[str, int]
    diffs: list[tuple[str, int]]
    renewals: int
    calls: int
    real_seconds: float
    duplicates: int
    throttling: list[Any]
    states: list[StateChange]

    def describe(self) -> str:
        return (
            f"seed {self.seed}: {self.orders} orders / {self.lines} lines, {self.edits} edits, "
            f"{self.restocks} restocks, faults injected {self.injected}, renewals "
            f"{self.renewals}, diffs {self.diffs}, settled after "
            f"{'never' if self.settled_after is None else f'{self.settled_after:.0f}s'}, "
            f"{self.calls} mall calls, {self.real_seconds:.1f}s real\n"
            f"{self.report.summary()}"
        )


def _fingerprint(fleet: Fleet) -> str:
    import hashlib

    h = hashlib.sha256()
    for store, sim in fleet.sims.items():
        for r in sim.requests:
            h.update(f"{store} {r.at:.6f} {r.method} {r.path} {r.api} {r.status}\n".encode())
        for key, listing in sorted(sim.listings.items()):
            h.update(f"{store} {key} {listing.quantity} {list(listing.set_history)}\n".encode())
    return h.hexdigest()[:16]


def run_scenario(sc: Scenario, tmp_root: str | None = None) -> Outcome:
    """Run ``sc`` under ``MockClock(autojump_threshold=0)``; a seed replays exactly.

    Determinism comes from: every random choice drawn from ``sc.seed`` (market, fault
    plan, simulators, daemon backoff jitter, trio's scheduler via its private ``_r``),
    no sockets between daemon and malls (``SimRouter``), the ledger inline
    (``inline_threads``), and the wall clock derived from trio's clock. The control
    socket used for operator actions is a real Unix socket, which is synchronous on one
    host, so it does not break determinism (checked by ``Outcome.fingerprint``).
    """
    import shutil
    import tempfile
    import time as _time

    import trio.testing

    from tests.helpers import checker, faults

    tmp = tempfile.mkdtemp(prefix=f"goqd-dst-{sc.seed}-", dir=tmp_root or _fast_tmp())
    started = _time.perf_counter()
    try:
        with inline_threads(), ordered_deadlines(), deterministic_scheduling(sc.seed):
            return trio.run(
                _scenario_main,
                sc,
                tmp,
                started,
                checker,
                faults,
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fast_tmp() -> str:
    # tmpfs: fsync costs nothing, so FULL durability does not slow the simulation down.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"


async def _scenario_main(
    sc: Scenario, tmp: str, started: float, checker: Any, faults: Any
) -> Outcome:
    import time as _time

    from goqd.control.client import call as control_call

    clock = mock_wall_clock
    rng = random.Random(sc.seed)
    fleet = build_fleet(sc.stores, clock=clock, seed=sc.seed, catalogue=sc.catalogue)
    router, urls = router_for(fleet)
    names = [s for s, _ in sc.stores]
    plan = sc.plan
    if plan is None:
        plan = faults.make_plan(
            sc.seed,
            names,
            duration=sc.market_seconds,
            kinds=tuple(sc.fault_kinds or faults.KINDS),
            latency=2 * _seconds(sc.request_timeout),
            healthy=sc.healthy,
        )
    diffs: list[tuple[str, int]] = []
    renewals = 0
    restocks = 0
    edits = 0
    records: list[Any] = []
    async with open_daemon(
        fleet,
        tmp,
        urls,
        transport=router,
        clock=clock,
        seed=sc.seed,
        poll_interval=sc.poll_interval,
        push_retry=sc.push_retry,
        request_timeout=sc.request_timeout,
        watch_interval=sc.watch_interval,
    ) as run:

        async def renew(store: str, creds: dict[str, str]) -> bool:
            nonlocal renewals
            try:
                await control_call(run.socket, p.KeySet(store=store, credentials=creds))
            except ControlError:
                return False
            renewals += 1
            return True

        async def reflect(store: str) -> bool:
            try:
                report = await control_call(run.socket, p.Diff(store=store))
                await control_call(run.socket, p.Reflect(store=store))
            except ControlError:
                return False
            diffs.append((store, len(report.rows)))
            return True

        async def run_faults() -> None:
            records.extend(
                await faults.run_plan(plan, fleet.sims, clock=clock, renew=renew, reflect=reflect)
            )

        market = fleet.market(rng, hot=list(sc.catalogue)[:2])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_faults)
            end = trio.current_time() + sc.market_seconds
            while trio.current_time() < end:
                await trio.sleep(rng.expovariate(1 / sc.order_interval))
                market.place_random(clock())
                roll = rng.random()
                if roll < sc.cancel_rate:
                    market.cancel_random()
                elif roll < sc.cancel_rate + sc.advance_rate:
                    market.advance_random()
                elif roll < sc.cancel_rate + sc.advance_rate + sc.edit_rate:
                    edits += _edit_random(market, rng)
                elif roll < sc.cancel_rate + sc.advance_rate + sc.edit_rate + sc.restock_rate:
                    sku = rng.choice(sorted(sc.catalogue))
                    units = rng.randint(1, 5)
                    with contextlib.suppress(ControlError):
                        await control_call(
                            run.socket, m.AdjustStock(sku=sku, delta=units, reason="restock")
                        )
                        market.real[sku] += units
                        restocks += 1
        faults_over = trio.current_time()
        settled_after: float | None = None
        deadline = faults_over + sc.settle_limit
        while trio.current_time() < deadline:
            await trio.sleep(5.0)
            if converged(fleet, run.ledger_path):
                settled_after = trio.current_time() - faults_over
                break
        report = checker.check(
            fleet.sims,
            run.ledger_path,
            invariants=("I1", "I2", "I3", "I4", "I6"),
            initial=fleet.initial,
            keys=fleet.keys,
            episodes=records,
            metrics_text=run.metrics_text(),
            states=run.states,
            # A fault met on a request's way in (a timeout) shows once the request has
            # timed out: up to a request timeout after the episode's last hit.
            visibility_slack=_seconds(sc.request_timeout) + 5.0,
        )
        throttling = [
            v
            for store, sim in fleet.sims.items()
            for v in checker.check_throttling(sim, store, records, plan_episodes(plan, store))
        ]
        with queries.open_read_only(run.ledger_path) as conn:
            duplicates = queries.counter(conn, "duplicates")
        return Outcome(
            seed=sc.seed,
            report=report,
            plan=plan,
            records=records,
            orders=len(market.placed),
            lines=report.lines,
            restocks=restocks,
            edits=edits,
            settled_after=settled_after,
            fingerprint=_fingerprint(fleet),
            injected=faults.injected(records),
            diffs=diffs,
            renewals=renewals,
            calls=router.calls,
            real_seconds=_time.perf_counter() - started,
            duplicates=int(duplicates),
            throttling=throttling,
            states=list(run.states),
        )


def plan_episodes(plan: Any, store: str) -> list[Any]:
    return [e for e in plan.episodes if e.store == store]


def _seconds(duration: str) -> float:
    from goqd.config import seconds

    return seconds(duration)


def _edit_random(market: Market, rng: random.Random) -> int:
    """The shop edits a live line's quantity (Rakuten 変更 and the like)."""
    live = [x for x in market.placed[-100:] if not x.order.cancelled]
    if not live:
        return 0
    victim = rng.choice(live)
    line = victim.order.lines[0]
    if line.cancelled:
        return 0
    new = max(1, line.quantity + rng.choice((-1, 1)))
    if new == line.quantity:
        return 0
    shelf = market.sims[victim.store].stock(line.listing_key)
    if shelf is not None and shelf < new - line.quantity:
        # A mall does not let an edit take more units than it shows: its counter would
        # go below 0, which no mall reports (au PAY's adapter refuses such a count).
        return 0
    market.sims[victim.store].edit_quantity(victim.order.order_id, line.line_id, new)
    market.real[victim.sku] = max(0, market.real[victim.sku] - (new - line.quantity))
    return 1


def run_dst(
    body: Callable[[Running], Any],
    *,
    seed: int = 0,
    stores: Sequence[tuple[str, str]] = (("ra", "rakuten"), ("rb", "rakuten")),
    catalogue: Mapping[str, int] = CATALOGUE,
    sim_options: Mapping[str, Mapping[str, Any]] | None = None,
    **config_kw: Any,
) -> Any:
    """Run ``await body(running)`` against an in-process daemon and a fleet, under the
    deterministic setup of ``run_scenario`` (MockClock, SimRouter, inline ledger)."""
    import shutil
    import tempfile

    import trio.testing

    tmp = tempfile.mkdtemp(prefix=f"goqd-dst-{seed}-", dir=_fast_tmp())
    config_kw.setdefault("poll_interval", "60s")
    config_kw.setdefault("push_retry", "10s")
    config_kw.setdefault("request_timeout", "10s")

    async def main() -> Any:
        fleet = build_fleet(
            stores, clock=mock_wall_clock, seed=seed, catalogue=catalogue, sim_options=sim_options
        )
        router, urls = router_for(fleet)
        async with open_daemon(
            fleet, tmp, urls, transport=router, clock=mock_wall_clock, seed=seed, **config_kw
        ) as run:
            await wait_for(
                lambda: converged(fleet, run.ledger_path),
                timeout=600,
                every=1.0,
                what="the initial catalogue to reach every mall",
            )
            return await body(run)

    try:
        with inline_threads(), ordered_deadlines(), deterministic_scheduling(seed):
            return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def outcome_json(o: Outcome, *, known: Callable[[Any], bool] = lambda v: False) -> dict[str, Any]:
    """One seed's result as JSON (``known`` marks throttling findings, docs/reliability.md
    catalogue entry E2, already reported)."""
    return {
        "seed": o.seed,
        "ok": o.report.ok,
        "violations": [str(v) for v in o.report.violations],
        "throttling": [str(v) for v in o.throttling if not known(v)],
        "throttling_known": sum(1 for v in o.throttling if known(v)),
        "settled_after": o.settled_after,
        "fingerprint": o.fingerprint,
        "orders": o.orders,
        "lines": o.lines,
        "edits": o.edits,
        "restocks": o.restocks,
        "episodes": len(o.records),
        "injected": o.injected,
        "renewals": o.renewals,
        "diffs": o.diffs,
        "duplicates": o.duplicates,
        "real_seconds": round(o.real_seconds, 3),
        "summary": o.describe(),
        "plan": o.plan.describe(),
    }


# How long after the faults a seed must have converged (virtual s): two poll intervals,
# the longest backoff (goqd.stores.actor.BACKOFF_MAX) and a push retry.
SETTLE_BOUND = 2 * 60 + 300 + 10


def replay_command(seed: int) -> str:
    return f"PYTHONHASHSEED=0 python -m tests.helpers.rig {seed} --text"


def seed_failure(result: Mapping[str, Any]) -> str | None:
    """Why one seed's JSON result (``outcome_json``) fails, with its replay; None if it
    passed: a violation, a rate overrun (catalogue entry E2) or no convergence within
    ``SETTLE_BOUND``."""
    late = result["settled_after"] is None or result["settled_after"] > SETTLE_BOUND
    if result["ok"] and not result["throttling"] and not late:
        return None
    return (
        f"seed {result['seed']} (replay: {replay_command(result['seed'])})\n"
        f"{result['summary']}\n{result['throttling']}\n{result['plan']}"
    )


def dst_figures(results: Sequence[Mapping[str, Any]], failures: int) -> str:
    """One line of figures for a set of seeds."""
    injected: dict[str, int] = {}
    for r in results:
        for kind, n in r["injected"].items():
            injected[kind] = injected.get(kind, 0) + n
    seeds = sorted(r["seed"] for r in results)
    return (
        f"DST: {len(results)} seeds ({seeds[0]}..{seeds[-1]}), "
        f"{sum(r['orders'] for r in results)} orders, {sum(r['lines'] for r in results)} lines, "
        f"{sum(r['episodes'] for r in results)} fault episodes, faults injected "
        f"{dict(sorted(injected.items()))} (total {sum(injected.values())}), "
        f"{sum(r['renewals'] for r in results)} key renewals, "
        f"{sum(len(r['diffs']) for r in results)} diff+reflect, "
        f"{sum(r['throttling_known'] for r in results)} known renewal-burst 429s, "
        f"settled within {max((r['settled_after'] or 0) for r in results):.0f}s virtual; "
        f"{failures} failing seeds"
    )


def crashed_json(seed: int, error: str) -> dict[str, Any]:
    """A seed whose scenario raised, in ``outcome_json``'s shape (it fails)."""
    return {
        "seed": seed,
        "ok": False,
        "violations": [],
        "throttling": [],
        "throttling_known": 0,
        "settled_after": None,
        "fingerprint": "",
        "orders": 0,
        "lines": 0,
        "edits": 0,
        "restocks": 0,
        "episodes": 0,
        "injected": {},
        "renewals": 0,
        "diffs": [],
        "duplicates": 0,
        "real_seconds": 0.0,
        "summary": f"seed {seed}: the scenario raised\n{error}",
        "plan": "",
    }


def renewal_burst(records: Sequence[Any], window: float = 2.0) -> Callable[[Any], bool]:
    """Is a throttling finding (E2) the known burst right after ``goqctl key set`` (the
    key test and the restarted session use fresh rate limiters)?"""
    ends = [(r.store, r.end) for r in records if r.kind == "expired_credential"]

    def known(v: Any) -> bool:
        import re

        at = re.search(r"t=([0-9.]+)", v.detail)
        return at is not None and any(
            v.subject == store and end - 0.5 <= float(at.group(1)) <= end + window
            for store, end in ends
        )

    return known


def _main(argv: Sequence[str]) -> int:
    """``python -m tests.helpers.rig SEED...`` replays seeds; ``--budget S --start N``
    runs seeds N, N+1, … until S seconds have passed (at least ``--min`` seeds). One JSON
    line per seed. Exact replay needs a fresh process and ``PYTHONHASHSEED=0`` (set
    iteration order)."""
    import argparse
    import time as _time

    from goqd.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m tests.helpers.rig")
    parser.add_argument("seeds", nargs="*", type=int)
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--text", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("warning", json=True, stream=open(os.devnull, "w"))  # noqa: SIM115
    seeds: Iterator[int] = iter(args.seeds)
    if args.budget:
        import itertools

        seeds = itertools.count(args.start)
    began = _time.perf_counter()
    for done, seed in enumerate(seeds):
        if args.budget and done >= args.min and _time.perf_counter() - began > args.budget:
            break
        try:
            outcome = run_scenario(Scenario(seed=seed))
        except Exception:  # one seed's crash is that seed's failure, not the run's end
            import traceback

            data = crashed_json(seed, traceback.format_exc())
        else:
            data = outcome_json(outcome, known=renewal_burst(outcome.records))
        if args.text:
            print(f"fingerprint {data['fingerprint']}\n{data['summary']}\n{data['plan']}")
        else:
            print(json.dumps(data, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
