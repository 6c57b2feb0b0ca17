"""Wiring: every channel, nursery and actor of ``goqd run`` is created here, and only here.

::

    root nursery (one_for_all: the ledger, control server or HTTP server failing
    stops the daemon and systemd restarts it)
      run_ledger                 the only writer of the SQLite file
      supervise(run_store) × N   one_for_one per store: restart with backoff, give up
                                 after intensity/period and mark the store ``down``
      serve_control              goqctl over the Unix socket
      serve_http                 /metrics, /healthz, webhooks
      run_watchdog               WATCHDOG=1 only while the ledger answers

``READY=1`` is sent only after every ``nursery.start`` above has returned. Whoever opens
a channel closes it: the ledger's send side belongs to this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import msgspec
import structlog
import trio
from prometheus_client import CollectorRegistry

from goqd import expiry, systemd
from goqd import messages as m
from goqd.config import (
    Config,
    StoreConfig,
    check_host,
    control_group_ids,
    credential_path,
    load_config,
    load_credentials,
    parse_credentials,
    write_credentials,
)
from goqd.control import protocol as p
from goqd.control.server import PeerInfo, WithProgress, serve_control
from goqd.csvio import ListingsReader, StockReader
from goqd.errors import (
    ConfigError,
    GoqdError,
    InputError,
    LedgerError,
    LedgerRequestFailed,
    LedgerUnavailable,
    MallAuthError,
    MallError,
    MallProtocolError,
    UnknownListing,
    UnknownSku,
)
from goqd.http import serve_http
from goqd.ledger import LedgerClient, open_ledger_channel, run_ledger
from goqd.logs import set_log_level
from goqd.malls.base import StoreContext, WebhookCheck, read_listings, tls_context
from goqd.malls.registry import MALLS
from goqd.malls.transport import MallTransport, mall_transport, open_mall_client
from goqd.metrics import Metrics
from goqd.reload import ReloadPlan, plan_reload, restart_keys, restart_message
from goqd.secret import Secret
from goqd.stores.actor import StoreHandle, run_store
from goqd.stores.credentials import CredentialKeeper
from goqd.supervisor import ChildSpec, supervise

log = structlog.get_logger("goqd.app")

VERSION = "0.1.0"
# MallError.code of an import the mall answered 404: an API the shop has not enabled.
API_NOT_ENABLED = "api_not_enabled"
WallClock = Callable[[], float]
Webhook = Callable[[bytes, Mapping[str, str]], Awaitable[int]]


@dataclass
class Daemon:
    """What a running daemon exposes to the control server, tests and ``goqd demo``."""

    config: Config
    ledger: LedgerClient
    handles: dict[str, StoreHandle]
    metrics: Metrics
    registry: CollectorRegistry
    clock: WallClock
    started_at: float
    http_url: str = ""
    transport: httpx.AsyncBaseTransport | None = None
    # Stock imports in progress, by request id; the nursery they run in
    # (``run_stock_imports``), ``None`` until it is open.
    _stock_imports: dict[str, _StockImport] = field(default_factory=dict, repr=False)
    # Listing imports by request id, running and the last few finished (``import_store``).
    _listing_imports: dict[str, _ListingImport] = field(default_factory=dict, repr=False)
    _import_nursery: trio.Nursery | None = field(default=None, repr=False)
    # What the last reload found (``reload``): changed keys that wait for a restart, and
    # why the last reload was refused ("" once one succeeds).
    restart_needed: tuple[str, ...] = ()
    reload_error: str = ""
    _reload_lock: trio.Lock = field(default_factory=trio.Lock, repr=False)

    # ------------------------------------------------------------------ status

    async def store_infos(
        self, stats: tuple[m.StoreLedgerStatus, ...] | None = None
    ) -> tuple[p.StoreInfo, ...]:
        if stats is None:
            stats = (await self.ledger.ask(m.GetStoreStats(), m.StoreStats)).stores
        per_store = {s.store: s for s in stats}
        infos = []
        for name, h in self.handles.items():
            ls = per_store.get(name)
            infos.append(
                p.StoreInfo(
                    name=name,
                    mall=h.mall,
                    state=h.state,
                    # The store's own state, or an open error in the ledger (an ambiguous
                    # link, parked lines, a refused listing) while it runs: LEVEL is
                    # never "-" while `goqctl errors` lists something for the store.
                    error_level=max(h.error_level, ls.max_error_level if ls else 0),
                    last_poll_ok_at=h.last_poll_ok_at,
                    last_push_ok_at=h.last_push_ok_at,
                    outbox=ls.outbox if ls else 0,
                    parked=ls.parked if ls else 0,
                    held=ls.held if ls else 0,
                    cursor=ls.cursor if ls else None,
                    credential_expires_at=h.credential_expires_at,
                    message=h.message,
                    key_warning=self._key_warning(h),
                    ambiguous=ls.ambiguous_listings if ls else 0,
                )
            )
        return tuple(infos)

    def _key_warning(self, h: StoreHandle) -> str:
        now = self.clock()
        state = expiry.expiry_state(
            h.credential_expires_at, now, self.config.daemon.key_warning_days
        )
        if state in ("warning", "expired"):
            return expiry.warning_message(h.name, h.mall, h.credential_expires_at, now)
        return ""

    async def status(self) -> p.DaemonStatus:
        ledger = await self.ledger.ask(m.GetLedgerStatus(), m.LedgerStatus)
        now = self.clock()
        return p.DaemonStatus(
            version=VERSION,
            started_at=self.started_at,
            uptime_s=now - self.started_at,
            stores=await self.store_infos(ledger.stores),
            ledger=ledger,
            restart_needed=self.restart_needed,
            reload_error=self.reload_error,
        )

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
            for level in {8, 9} | set(levels):
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
        """Read the config file and every credential again; apply what may change live.

        The file and the credentials must pass the checks ``goqd run`` makes at start
        (``load_config``, ``check_host``, ``load_credentials``), or nothing changes: the
        refusal is logged once (``config_reload_refused``, naming the file, the key and
        the reason), counted (``goqd_config_reloads_total{outcome="refused"}``) and shown
        by ``goqctl status``, and the daemon runs on as it was. Otherwise the live keys
        (``goqd.reload``) take effect: each store whose settings or credential changed
        gets a new mall session through its handle (``StoreHandle.reconfigure``: a store
        stopped at level 9 stays stopped), and every other changed key is logged as
        ``config_key_needs_restart``. systemd hears ``RELOADING=1`` before and
        ``READY=1`` after, either way.

        Returns the plan applied, or None if the reload was refused.
        """
        async with self._reload_lock:
            systemd.reloading("reloading the configuration")
            status = "reload failed"
            try:
                plan = await self._reload()
                stores = f"{len(self.handles)} stores"
                if plan is None:
                    status = f"{stores}; reload refused: {self.reload_error}"
                elif plan.restart:
                    status = f"{stores}; reloaded, {len(plan.restart)} change(s) need a restart"
                else:
                    status = f"{stores}; reloaded"
                return plan
            finally:
                systemd.ready(status)

    async def _reload(self) -> ReloadPlan | None:
        source = self.config.source
        # The stores' credential locks: a `goqctl key set`, or a token the mall renewed,
        # is written and handed to its store whole, before or after this reload.
        async with contextlib.AsyncExitStack() as locks:
            for name in sorted(self.handles):
                keeper = self.handles[name].credential_keeper
                if keeper is not None:
                    await locks.enter_async_context(keeper.lock)
            try:
                if not source:
                    raise ConfigError("<config>", "$", "the config was not read from a file")
                loaded, plan = await trio.to_thread.run_sync(_load_for_reload, self.config)
                fresh = await trio.to_thread.run_sync(_read_credentials, loaded, plan.config)
            except (GoqdError, OSError) as exc:
                self._refuse_reload(source, str(exc))
                return None
            # Broad on purpose: a reload is a request to a daemon that is syncing stores;
            # a bug met while reading the files refuses the reload, it does not stop them.
            except Exception:
                log.exception("config_reload_failed", file=source)
                self._refuse_reload(source, "internal error (logged as config_reload_failed)")
                return None
            self._apply_reload(plan, fresh)
        return plan

    def _refuse_reload(self, source: str, reason: str) -> None:
        log.error(
            "config_reload_refused",
            file=source,
            error=reason,
            message="nothing changed: goqd runs on with the configuration it had; "
            "fix the file and reload again",
        )
        self.reload_error = reason
        self.metrics.config_reloads_total.labels("refused").inc()
        self.metrics.config_last_reload_successful.set(0)

    def _apply_reload(self, plan: ReloadPlan, fresh: dict[str, dict[str, Secret]]) -> None:
        """Apply ``plan`` and the credentials read with it (no await: all or nothing)."""
        old = self.config
        self.config = plan.config
        if plan.config.daemon.log_level != old.daemon.log_level:
            set_log_level(plan.config.daemon.log_level)
        restarted = []
        for name, handle in self.handles.items():
            cfg = plan.config.store(name)
            creds = self._credentials_to_apply(name, handle, fresh.get(name))
            if cfg != old.store(name) or creds is not None:
                handle.reconfigure(cfg, creds if creds is not None else handle.credentials)
                restarted.append(name)
            if creds is not None:
                log.info(
                    "credential_reloaded",
                    store=name,
                    message="the store stays stopped until its level-9 error is cleared: "
                    f"goqctl errors clear --store {name}"
                    if handle.state == "stopped"
                    else "the store's new mall session uses it",
                )
        for key in plan.restart:
            log.warning("config_key_needs_restart", key=key, message=restart_message(plan, key))
        self.restart_needed = restart_keys(plan)
        self.reload_error = ""
        self.metrics.config_reloads_total.labels("ok").inc()
        self.metrics.config_last_reload_successful.set(1)
        self.metrics.config_restart_needed_keys.set(len(plan.restart))
        log.info(
            "config_reloaded",
            file=plan.config.source,
            applied=list(plan.live),
            restart_needed=list(plan.restart),
            sessions_restarted=restarted,
        )

    def _credentials_to_apply(
        self, store: str, handle: StoreHandle, read: dict[str, Secret] | None
    ) -> dict[str, Secret] | None:
        """The credential just ``read`` from the store's file, if the store should take it.

        Only a file that changed since goqd last read or wrote it (``CredentialKeeper``):
        memory may be ahead of a file goqd wrote (a token the mall renewed, being written
        or not written at all), and the file's older token would be refused.
        """
        keeper = handle.credential_keeper
        if read is None or keeper is None:
            return None
        known, keeper.on_disk = keeper.on_disk, dict(read)
        if read == handle.credentials or read == known:
            return None
        return dict(read)

    # ------------------------------------------------------------------ control

    def _handle(self, store: str) -> StoreHandle:
        try:
            return self.handles[store]
        except KeyError:
            raise _NotFound(f"no store named {store!r}; see `goqctl stores`") from None

    async def handle_control(
        self, req: p.ControlRequest, peer: PeerInfo, report: p.ReportProgress = p.no_progress
    ) -> p.Ok | p.Err:
        """Answer one control request. Refusals are ``Err`` replies, never exceptions.

        The long ones (import, diff, reflect, stock import) tell ``report`` how far they
        have got as they go."""
        try:
            return p.Ok(result=await self._dispatch(req, report))
        except _NotFound as exc:
            return p.Err(code="not_found", message=str(exc))
        except MallAuthError as exc:
            return p.Err(
                code="conflict",
                message=f"the mall rejected the credential: {exc}",
                hint="check the key in the mall's admin screen and try again",
            )
        except MallError as exc:
            if exc.code == API_NOT_ENABLED:
                return p.Err(
                    code="unavailable",
                    message=str(exc),
                    hint="enable that API for the shop in the mall's admin screen (or the "
                    "app's permissions), then run the import again",
                )
            return p.Err(code="unavailable", message=str(exc), hint="try again shortly")
        except InputError as exc:
            return p.Err(code="bad_request", message=str(exc), hint="fix the file and run again")
        except LedgerUnavailable as exc:
            # Nothing was applied and nothing is wrong with the request: a retry (with
            # the same request id) may well succeed.
            return p.Err(code="unavailable", message=str(exc), hint="try again shortly")
        except LedgerRequestFailed as exc:
            return p.Err(
                code="internal",
                message=str(exc),
                hint="this is a bug: see `journalctl -u goqd` (event ledger_request_failed)",
            )
        except GoqdError as exc:
            return p.Err(code="conflict", message=str(exc))

    async def _dispatch(self, req: p.ControlRequest, report: p.ReportProgress) -> Any:
        led = self.ledger
        rid = getattr(req, "request_id", "")
        match req:
            case p.Status():
                return await self.status()
            case p.Stores():
                return p.StoreList(stores=await self.store_infos())
            case p.Errors():
                if req.store:
                    self._handle(req.store)
                return await led.ask(
                    m.ListErrors(
                        store=req.store,
                        include_cleared=req.include_cleared,
                        level=req.level,
                        code=req.code,
                        after=req.after,
                        limit=req.limit,
                    ),
                    m.ErrorList,
                )
            case p.Parked():
                if req.store:
                    self._handle(req.store)
                return await led.ask(
                    m.ListParked(store=req.store, after=req.after, limit=req.limit), m.ParkedList
                )
            case p.ErrorsClear():
                done = await led.ask(
                    m.ClearErrors(ids=req.ids, store=req.store, request_id=rid), m.Done
                )
                await self._resume_cleared()
                return done
            case p.KeySet():
                return await self.key_set(req.store, req.credentials)
            case p.Pause():
                self._handle(req.store).pause()
                return m.Done(changed=1)
            case p.Resume():
                self._handle(req.store).resume()
                return m.Done(changed=1)
            case p.PollNow():
                self._handle(req.store).request_poll()
                return m.Done(changed=1)
            case p.Products():
                return await led.ask(
                    m.ListProducts(after=req.after, limit=req.limit), m.ProductList
                )
            case p.Listings():
                self._handle(req.store)
                return await led.ask(
                    m.ListListings(
                        store=req.store,
                        after=req.after,
                        limit=req.limit,
                        state=req.state,
                        search=req.search,
                    ),
                    m.ListingList,
                )
            case p.LinkListing():
                # A store not in the config would get a listing row nothing ever removes.
                self._handle(req.store)
                try:
                    return await led.ask(
                        m.Link(
                            store=req.store,
                            listing_key=req.listing_key,
                            sku=req.sku,
                            request_id=rid,
                        ),
                        m.Done,
                    )
                except (UnknownListing, UnknownSku) as exc:
                    raise _NotFound(str(exc)) from None
            case p.UnlinkListing():
                self._handle(req.store)
                try:
                    return await led.ask(
                        m.Unlink(store=req.store, listing_key=req.listing_key, request_id=rid),
                        m.Done,
                    )
                except UnknownListing as exc:
                    raise _NotFound(str(exc)) from None
            case p.StockSet():
                return await led.ask(
                    m.SetStock(
                        sku=req.sku, quantity=req.quantity, reason=req.reason, request_id=rid
                    ),
                    m.StockChanged,
                )
            case p.StockAdjust():
                return await led.ask(
                    m.AdjustStock(sku=req.sku, delta=req.delta, reason=req.reason, request_id=rid),
                    m.StockChanged,
                )
            case p.History():
                return await led.ask(m.GetHistory(sku=req.sku, limit=req.limit), m.History)
            case p.ListingSet():
                return await led.ask(
                    m.SetListingAttrs(
                        store=req.store,
                        listing_key=req.listing_key,
                        lead_time_days=req.lead_time_days,
                        restock_date=req.restock_date,
                        allow_overdraft=req.allow_overdraft,
                        request_id=rid,
                    ),
                    m.Done,
                )
            case p.DeleteProduct():
                return await led.ask(m.DeleteProduct(sku=req.sku, request_id=rid), m.Done)
            case p.Diff():
                return await self.diff(req.store, report=report)
            case p.Reflect():
                return await self.reflect(
                    req.store, req.listing_keys, rid, req.differing, report=report
                )
            case p.Import():
                return await self.import_store(
                    req.store,
                    req.csv_text,
                    create_products=req.create_products,
                    request_id=rid,
                    report=report,
                )
            case p.ProductAdd():
                return await self.product_add(req.sku, req.quantity, req.name, rid)
            case p.LinkAuto():
                return await self.link_auto(req.store)
            case p.StockImport():
                return await self.stock_import(req.csv_text, rid, report=report)
        raise _Unsupported(type(req).__name__)

    async def _resume_cleared(self) -> None:
        """A stopped store whose level-9 errors are all cleared resumes (docs/design.md §2.4)."""
        for name, handle in self.handles.items():
            if handle.state != "stopped":
                continue
            errors = await self.ledger.ask(m.ListErrors(store=name, level=9, limit=1), m.ErrorList)
            if not errors.errors:
                log.info("store_resumed", store=name, reason="level-9 errors cleared")
                handle.resume()

    async def key_set(self, store: str, data: dict[str, str]) -> m.Done:
        """Test a new credential against the mall; on success store it and resume."""
        handle = self._handle(store)
        cfg = self.config.store(store)
        spec = MALLS[cfg.mall]
        creds = parse_credentials(f"key set {store}", cfg.mall, data, spec.credential_fields)
        async with self._adapter(cfg, creds) as adapter:
            await adapter.check_credentials()
            expires = await _optional_expiry(adapter)
        keeper = handle.credential_keeper
        # Stored as the test left it (a refresh token the mall rotated during the test
        # included), under the store's credential lock: a save by the session this
        # replaces never lands after it.
        async with keeper.lock if keeper is not None else trio.Lock():
            stored = {name: value.reveal() for name, value in creds.items()}
            await trio.to_thread.run_sync(write_credentials, self.config, store, stored)
            if keeper is not None:
                # What the file now holds: a reload compares the file with this.
                keeper.on_disk = dict(creds)
            await self.ledger.call(m.ClearErrors(store=store, level=9, request_id=""))
            handle.credential_expires_at = expires
            handle.renew(creds)
        log.info("credential_renewed", store=store)
        return m.Done(changed=1, detail="credential stored; store resumed")

    def _adapter(self, cfg: StoreConfig, creds: dict[str, Secret]) -> _AdapterSession:
        return _AdapterSession(self, cfg, creds)

    async def diff(self, store: str, *, report: p.ReportProgress = p.no_progress) -> p.DiffReport:
        """差異商品: linked listings whose mall count is not what goqd has the malls show.

        Each page of the store's linked listings is read from the ledger, then at the
        mall, then from the ledger again: a listing with a push queued or in flight, or
        whose count or last push moved while the mall was read, is ``pending``, not 差異
        (the push will settle it); one whose difference is within the units the sale
        watch holds for its product is ``held``; one whose product has no count is
        ``no_count``; one whose count is right but a mall attribute goqd pushes (lead
        time, restock date, 超過購入) is not is ``attrs``, since the next push overwrites
        what was changed at the mall. The 差異 and ``attrs`` listings are kept
        (``DiffFound``) for `reflect --differing`, and only once the whole store was
        read: a diff cut short by the mall keeps the last one. ``report`` hears the
        linked listings compared so far, of those the store had when the diff began.
        """
        handle = self._handle(store)
        cfg = self.config.store(store)
        spec = MALLS[cfg.mall]
        rows: list[p.DiffRow] = []
        checked = 0
        after = ""
        linked_total = await self.ledger.ask(m.CountListings(store=store), m.ListingCount)
        compared = 0
        report(p.Progress(phase="compare", done=0, total=linked_total.count, unit="listings"))
        async with self._adapter(cfg, handle.credentials) as adapter:
            while True:
                page = await self.ledger.ask(
                    m.ListListings(
                        store=store, after=after, limit=spec.limits.read_batch, state="linked"
                    ),
                    m.ListingList,
                )
                if not page.listings:
                    break
                after = page.listings[-1].listing_key
                linked = [x for x in page.listings if x.sku]
                if not linked:
                    continue
                keys = tuple(x.listing_key for x in linked)
                counts = await read_listings(adapter, keys)
                now = await self.ledger.ask(
                    m.ListListings(store=store, keys=keys, limit=len(keys)), m.ListingList
                )
                later = {x.listing_key: x for x in now.listings}
                for before in linked:
                    current = later.get(before.listing_key)
                    if current is None or current.link_state != "linked" or not current.sku:
                        continue  # unlinked meanwhile: not goqd's to compare any more
                    checked += 1
                    row = _diff_row(before, current, counts.get(before.listing_key))
                    if row is not None:
                        rows.append(row)
                # Listings linked since the diff began may take it past the total.
                compared += len(linked)
                report(
                    p.Progress(
                        phase="compare",
                        done=compared,
                        total=max(compared, linked_total.count),
                        unit="listings",
                    )
                )
        differing = tuple(r.listing_key for r in rows if r.status in ("differs", "attrs"))
        await self.ledger.ask(
            m.DiffFound(store=store, listing_keys=differing, checked=checked), m.Done
        )
        return p.DiffReport(store=store, rows=tuple(rows), checked=checked)

    async def reflect(
        self,
        store: str,
        keys: tuple[str, ...],
        request_id: str,
        differing: bool = False,
        *,
        report: p.ReportProgress = p.no_progress,
    ) -> m.Done:
        """反映: queue the ledger's count for the given listings (every linked one if none;
        with ``differing``, those the store's last diff found 差異).

        The pushes go out through the store actor like any other, within the mall's
        batch limit, so the operator never pages.
        """
        self._handle(store)
        if differing:
            return await self.ledger.ask(
                m.ReflectDiffering(store=store, request_id=request_id), m.Done
            )
        if not keys:
            return await self._reflect_all(store, request_id, report)
        return await self.ledger.ask(
            m.QueuePushes(store=store, listing_keys=keys, request_id=request_id), m.Done
        )

    async def _reflect_all(self, store: str, request_id: str, report: p.ReportProgress) -> m.Done:
        """`reflect --all`: every linked listing, ``REFLECT_CHUNK`` a ledger request.

        One request for 100,000 listings would hold the ledger for seconds (the watchdog
        and every store's bookings wait behind it); a chunk holds it about 0.1 s. Each
        chunk's request id is the request's id and the chunk's listings, so a retry with
        the same id that finds the same listings gets the chunks already queued answered
        from the ledger, not queued again, and the same reply. A chunk queued twice
        (listings changed between the runs) pushes the same counts again, which changes
        nothing at the mall; a run cut short leaves pushes queued that are as right as
        any push goqd queues.
        """
        total = (await self.ledger.ask(m.CountListings(store=store), m.ListingCount)).count
        report(p.Progress(phase="queue", done=0, total=total, unit="listings"))
        queued = seen = 0
        after = ""
        while True:
            page = await self.ledger.ask(
                m.ListListings(store=store, after=after, limit=REFLECT_CHUNK, state="linked"),
                m.ListingList,
            )
            if not page.listings:
                break
            after = page.listings[-1].listing_key
            chunk = tuple(x.listing_key for x in page.listings)
            done = await self.ledger.ask(
                m.QueuePushes(
                    store=store,
                    listing_keys=chunk,
                    strict=False,  # unlinked since the page was read: left out
                    request_id=_chunk_request_id(request_id, chunk),
                ),
                m.Done,
            )
            queued += done.changed
            seen += len(chunk)
            report(p.Progress(phase="queue", done=seen, total=max(seen, total), unit="listings"))
        return m.Done(changed=queued, detail=f"{queued} listing(s) queued for a push")

    async def import_store(
        self,
        store: str,
        csv_text: str | None,
        *,
        create_products: bool = False,
        request_id: str = "",
        report: p.ReportProgress = p.no_progress,
    ) -> m.LinkReport:
        """Read every listing of ``store`` (its mall's API, or a goqd CSV) into the ledger.

        Importing the base store (基本モール) creates products; any other store links its
        listings by the link condition, and with ``create_products`` creates a product
        for each listing no product matches. Re-import updates listings, never duplicates.

        A CSV is read and checked whole in a worker thread (never on the event loop)
        before its first chunk is applied, so a bad row anywhere changes nothing. Each
        chunk of ``IMPORT_CHUNK`` listings is one ledger request: the watchdog, bookings
        and every store are answered between chunks. ``report`` hears the listings read
        from the mall, or the CSV's listings applied of all of them.

        An import with a request id runs in the imports nursery and this only waits for
        it: a goqctl that goes away does not cut it short, and a request with the same id
        (while it runs, or one of the last ``LISTING_IMPORTS_KEPT`` finished) waits for
        it and gets its reply instead of importing again. The same id with another store
        or file is refused. A failed import is forgotten, so its retry runs again; so is
        every import when the daemon restarts (they are kept in memory only): the retry
        then imports again, which updates listings and never duplicates them, and its
        reply counts that run (goqctl's hint after Ctrl-C says so).
        """
        self._handle(store)
        nursery = self._import_nursery
        work = functools.partial(self._import_listings, store, csv_text, create_products)
        if nursery is None or not request_id:
            return await work(report)
        digest = await trio.to_thread.run_sync(_import_digest, store, csv_text, create_products)
        job = self._listing_imports.get(request_id)
        if job is None:
            job = _ListingImport(digest=digest)
            self._listing_imports[request_id] = job
            nursery.start_soon(self._run_listing_import, request_id, job, work)
        elif job.digest != digest:
            raise LedgerError(
                f"request id {request_id!r} is already used for an import of another store "
                "or file; nothing of this one was applied: send it with a new id"
            )
        return await job.outcome(
            report,
            stopped="the daemon stopped before the import finished; what was imported "
            "stays (an import can be run again: it updates, never duplicates)",
        )

    async def _run_listing_import(
        self,
        key: str,
        job: _ListingImport,
        work: Callable[[p.ReportProgress], Awaitable[m.LinkReport]],
    ) -> None:
        try:
            job.result = await work(job.report)
        except GoqdError as exc:
            job.error = exc
        # Broad on purpose, as for stock imports: one import's bug is its own error.
        except Exception:
            log.exception("listing_import_failed")
            job.error = LedgerError(
                "the import failed with an internal error (logged as listing_import_failed)"
            )
        finally:
            job.finished.set()
            jobs = self._listing_imports
            if job.result is None and jobs.get(key) is job:
                del jobs[key]
            finished = [k for k, j in jobs.items() if j.finished.is_set()]
            for old in finished[: max(0, len(finished) - LISTING_IMPORTS_KEPT)]:
                del jobs[old]

    async def _import_listings(
        self,
        store: str,
        csv_text: str | None,
        create_products: bool,
        report: p.ReportProgress,
    ) -> m.LinkReport:
        cfg = self.config.store(store)
        base = store == self.config.daemon.base_store
        import_chunk = functools.partial(self._import_chunk, cfg, base, create_products)
        total: m.LinkReport | None = None
        if csv_text is not None:
            report(p.Progress(phase="check", done=0, unit="rows"))
            blobs = await _read_listings_csv(csv_text, where=f"import CSV for {store}")
            count = sum(n for n, _ in blobs)
            done = 0
            report(p.Progress(phase="import", done=0, total=count, unit="listings"))
            for n, blob in blobs:
                total = _add_reports(total, await import_chunk(_listings_decoder.decode(blob)))
                done += n
                report(p.Progress(phase="import", done=done, total=count, unit="listings"))
            return total if total is not None else await import_chunk(())
        session = self._adapter(cfg, self.handles[store].credentials)
        try:
            async with session as adapter:
                chunk: list[m.MallListing] = []
                read = 0
                report(p.Progress(phase="import", done=0, unit="listings"))
                async for listing in adapter.iter_listings():
                    chunk.append(listing)
                    read += 1
                    report(p.Progress(phase="import", done=read, unit="listings"))
                    if len(chunk) >= IMPORT_CHUNK:
                        total = _add_reports(total, await import_chunk(tuple(chunk)))
                        chunk = []
                total = _add_reports(total, await import_chunk(tuple(chunk)))
        except MallError as exc:
            missing = session.not_found()
            if missing is None or not isinstance(exc, MallProtocolError):
                raise
            # A 404 is no outage to wait out: the shop has not enabled that API (or the
            # app lacks its scope), and every retry gets the same answer.
            raise MallProtocolError(
                f"{exc.message}; {missing} answered 404 Not Found: that API is not enabled "
                f"for this shop at {MALLS[cfg.mall].title}",
                mall=cfg.mall,
                store=store,
                code=API_NOT_ENABLED,
            ) from exc
        return total

    async def _import_chunk(
        self,
        cfg: StoreConfig,
        base: bool,
        create_products: bool,
        listings: tuple[m.MallListing, ...],
    ) -> m.LinkReport:
        return await self.ledger.ask(
            m.ImportListings(
                store=cfg.name,
                listings=listings,
                base=base,
                rules=tuple(cfg.link_normalize),
                default_lead_time=cfg.default_lead_time,
                create_products=create_products,
            ),
            m.LinkReport,
        )

    async def stock_import(
        self, csv_text: str, request_id: str, *, report: p.ReportProgress = p.no_progress
    ) -> m.Done:
        """`goqctl stock import`: set or adjust totals from a stock CSV, every row or none.

        The file is read in a worker thread and staged in the ledger ``STAGE_CHUNK`` rows
        a request; once every row has passed its checks the import is sealed and applied
        ``APPLY_CHUNK`` rows a transaction, so the ledger goes on answering the watchdog,
        bookings and every store throughout. A sealed import is finished even if the
        daemon stops half-way (``run_stock_imports`` resumes it at the next start).

        The work runs in the imports nursery and this only waits for it: a goqctl that
        disconnects does not cut its import short, and a retry with the same request id
        waits for the same import (or gets its stored reply) instead of applying the
        file again. The same id with another file is refused. Every request waiting on
        an import hears its progress (rows staged, then rows applied of all staged).
        """
        nursery = self._import_nursery
        if nursery is None:
            raise LedgerUnavailable("the daemon is not taking stock imports yet")
        digest = await trio.to_thread.run_sync(_digest, csv_text)
        key = request_id or f"anonymous-{uuid.uuid4().hex}"
        job = self._stock_imports.get(key)
        if job is None:
            job = _StockImport(digest=digest)
            self._stock_imports[key] = job
            work = functools.partial(
                self._stage_stock_import, csv_text, request_id, digest, job.report
            )
            nursery.start_soon(self._run_stock_import, key, job, work)
        elif job.digest != digest:
            raise LedgerError(
                f"request id {request_id!r} is already importing a different stock CSV; "
                "nothing of this one was applied: send it with a new id"
            )
        return await job.outcome(
            report,
            stopped="the daemon stopped before the stock import finished; if it was "
            "staged whole it is applied at the next start, else nothing of it was applied",
        )

    async def run_stock_imports(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every stock import, and finish the ones a stop cut short.

        Resource handling: opens the nursery imports run in and keeps it open until
        cancelled. Before ``started()`` it asks the ledger for imports with work left: a
        sealed one is applied to the end (a retry of its request waits for it); one never
        sealed is discarded, a chunk of staged rows at a time (its request never got an
        answer; a retry stages the file again).

        Error handling: an import's failure is answered to its caller, never raised here.
        An unexpected exception in one import is logged as ``stock_import_failed``;
        ledger errors while applying a sealed import are retried with backoff until it is
        done, because it must not stay half-applied. If the ledger cannot list imports at
        start, that is logged and the next start tries again.
        """
        async with trio.open_nursery() as nursery:
            pending: tuple[m.StockImportJob, ...] = ()
            try:
                pending = (await self.ledger.ask(m.ListStockImports(), m.StockImportList)).imports
            except LedgerError as exc:
                log.error("stock_imports_unlisted", error=str(exc))
            for job in pending:
                if job.state == "applying":
                    key = job.request_id or f"import-{job.import_id}"
                    entry = _StockImport(digest=job.digest)
                    self._stock_imports[key] = entry
                    log.info(
                        "stock_import_resumed",
                        import_id=job.import_id,
                        staged=job.staged,
                        applied=job.applied + job.skipped,
                    )
                    work = functools.partial(self._apply_stock_import, job.import_id, entry.report)
                    nursery.start_soon(self._run_stock_import, key, entry, work)
                else:
                    nursery.start_soon(self._discard_stock_import, job.import_id)
            self._import_nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._import_nursery = None

    async def _run_stock_import(
        self, key: str, job: _StockImport, work: Callable[[], Awaitable[m.Done]]
    ) -> None:
        try:
            job.result = await work()
        except GoqdError as exc:
            job.error = exc
        # Broad on purpose: every import runs in one nursery with the daemon's lifetime;
        # one import's bug is that import's error, not the daemon's end.
        except Exception:
            log.exception("stock_import_failed")
            job.error = LedgerError(
                "the stock import failed with an internal error (logged as stock_import_failed)"
            )
        finally:
            job.finished.set()
            if self._stock_imports.get(key) is job:
                del self._stock_imports[key]

    async def _stage_stock_import(
        self, csv_text: str, request_id: str, digest: bytes, report: p.ReportProgress
    ) -> m.Done:
        where = "stock CSV"
        led = self.ledger
        reader = await trio.to_thread.run_sync(
            functools.partial(StockReader, csv_text, where=where)
        )
        job = await led.ask(
            m.BeginStockImport(
                request_id=request_id, digest=digest, mode=reader.mode, reason="stock import"
            ),
            m.StockImportJob,
        )
        if job.state == "done" and job.result is not None:
            return job.result
        if job.state == "staging":
            try:
                report(p.Progress(phase="stage", done=0, unit="rows"))
                while rows := await trio.to_thread.run_sync(reader.read, STAGE_CHUNK):
                    await led.ask(
                        m.StageStockRows(import_id=job.import_id, rows=tuple(rows), where=where),
                        m.Done,
                    )
                    report(p.Progress(phase="stage", done=reader.rows_read, unit="rows"))
                await led.ask(
                    m.SealStockImport(import_id=job.import_id, rows=reader.rows_read),
                    m.StockImportJob,
                )
            except GoqdError:
                # Refused before it was sealed: nothing was applied, and its staged rows
                # are gone before the caller hears so.
                await self._discard_stock_import(job.import_id)
                raise
            log.info("stock_import_staged", import_id=job.import_id, rows=reader.rows_read)
        return await self._apply_stock_import(job.import_id, report)

    async def _apply_stock_import(
        self, import_id: int, report: p.ReportProgress = p.no_progress
    ) -> m.Done:
        delay = APPLY_RETRY_S
        failing = False
        while True:
            try:
                job = await self.ledger.ask(
                    m.ApplyStockImport(import_id=import_id, limit=APPLY_CHUNK), m.StockImportJob
                )
            except LedgerError as exc:
                if not failing:
                    log.error("stock_import_apply_failed", import_id=import_id, error=str(exc))
                    failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, APPLY_RETRY_MAX_S)
                continue
            if failing:
                log.info("stock_import_apply_recovered", import_id=import_id)
                failing, delay = False, APPLY_RETRY_S
            report(
                p.Progress(
                    phase="apply", done=job.applied + job.skipped, total=job.staged, unit="rows"
                )
            )
            if job.state == "done" and job.result is not None:
                log.info(
                    "stock_import_applied",
                    import_id=import_id,
                    applied=job.applied,
                    skipped=job.skipped,
                )
                return job.result
            if job.state != "applying":
                raise LedgerError(f"stock import {import_id} is {job.state}; nothing to apply")

    async def _discard_stock_import(self, import_id: int) -> None:
        try:
            while True:
                done = await self.ledger.ask(
                    m.DiscardStockImport(import_id=import_id, limit=DISCARD_CHUNK), m.Done
                )
                if not done.changed:
                    return
        except LedgerError as exc:
            # Staged rows of a discarded import only take space; the next start retries.
            log.warning("stock_import_discard_failed", import_id=import_id, error=str(exc))

    async def link_auto(self, store: str) -> m.LinkReport:
        """`goqctl link --auto [STORE]`: link what the link condition now matches."""
        stores = [store] if store else list(self.handles)
        total: m.LinkReport | None = None
        for name in stores:
            cfg = self.config.store(self._handle(name).name)
            report = await self.ledger.ask(
                m.AutoLink(store=name, rules=tuple(cfg.link_normalize)), m.LinkReport
            )
            total = _add_reports(total, report)
        assert total is not None
        return msgspec.structs.replace(total, store=store)

    async def product_add(
        self, sku: str, quantity: int, name: str, request_id: str
    ) -> m.ProductAdded:
        """`goqctl product add`: a product from no store's import, with the operator's
        count; then the listings of every configured store the link condition matches to
        it are linked (each store under its own rules), and their pushes queued."""
        stores = tuple((s.name, tuple(s.link_normalize)) for s in self.config.stores)
        return await self.ledger.ask(
            m.AddProduct(
                sku=sku, quantity=quantity, name=name, stores=stores, request_id=request_id
            ),
            m.ProductAdded,
        )


def _shown(x: m.ListingRecord) -> int:
    """What goqd has the malls show for the listing's product: its total less held units."""
    return max(0, (x.product_total or 0) - x.product_held)


def _diff_row(
    before: m.ListingRecord, now: m.ListingRecord, mall: m.MallCount | None
) -> p.DiffRow | None:
    """One listing's diff row, ``None`` when the mall shows what goqd does.

    ``before`` and ``now`` are the ledger's view of the listing just before and just
    after the mall was read.
    """
    assert now.sku is not None
    want = _shown(now)
    quantity = mall.quantity if mall is not None else None
    attrs = _attrs_differ(now.attrs, mall.attrs) if mall is not None else ()
    if quantity == want and now.count_known and not attrs:
        return None
    moved = (
        before.pending_quantity is not None
        or now.pending_quantity is not None
        or before.last_pushed_version != now.last_pushed_version
        or _shown(before) != want
    )
    if not now.count_known:
        status: p.DiffStatus = "no_count"
    elif moved:
        status = "pending"
    # Held units are sales goqd takes off every mall before their orders arrive: a mall
    # not lowered yet shows up to that many more, never fewer.
    elif now.product_held and quantity is not None and 0 < quantity - want <= now.product_held:
        # The held units settle on their own; changed attributes only with a push.
        status = "attrs" if attrs else "held"
    elif quantity == want:
        status = "attrs"
    else:
        status = "differs"
    return p.DiffRow(
        listing_key=now.listing_key,
        sku=now.sku,
        ledger_quantity=want,
        mall_quantity=quantity,
        pending_quantity=now.pending_quantity
        if now.pending_quantity is not None
        else before.pending_quantity,
        held=now.product_held,
        status=status,
        attrs_differ=attrs,
    )


def _attrs_differ(ledger: m.ListingAttrs, mall: m.ListingAttrs) -> tuple[p.AttrDiff, ...]:
    """The attributes goqd pushes that the mall holds otherwise. A lead time or restock
    date goqd holds no value for is not pushed, and one the mall reports none for has
    nothing to compare. 超過購入 is different: Yahoo's every push sends it, and sends
    "no value" as off, so an operator's "on" at the mall is a difference either way."""
    pairs: tuple[tuple[p.AttrName, int | str | bool | None, int | str | bool | None], ...] = (
        ("lead_time", ledger.lead_time_days, mall.lead_time_days),
        ("restock_date", ledger.restock_date, mall.restock_date),
        ("allow_overdraft", bool(ledger.allow_overdraft), mall.allow_overdraft),
    )
    return tuple(
        p.AttrDiff(name=name, ledger=ours, mall=theirs)
        for name, ours, theirs in pairs
        if ours is not None and theirs is not None and ours != theirs
    )


IMPORT_CHUNK = 1000
# Finished listing imports kept, by request id, for a retry to get the same reply.
LISTING_IMPORTS_KEPT = 64
# `reflect --all`: linked listings queued per ledger request (about 0.1 s each).
REFLECT_CHUNK = 2000
# Stock imports: rows read (in a worker thread) and staged per ledger request; rows
# applied per ledger transaction (about 0.1 s each, so the watchdog's ping and every
# store's bookings wait at most that long); staged rows of a dropped import deleted per
# request. Retry of a failed apply: first delay, doubling up to the max.
STAGE_CHUNK = 5000
APPLY_CHUNK = 2000
DISCARD_CHUNK = 20_000
APPLY_RETRY_S = 1.0
APPLY_RETRY_MAX_S = 30.0
# A listings CSV is read this many IMPORT_CHUNKs per worker-thread hop.
_READ_CHUNKS = 10
_listings_encoder = msgspec.msgpack.Encoder()
_listings_decoder = msgspec.msgpack.Decoder(tuple[m.MallListing, ...])


_R = TypeVar("_R")


@dataclass
class _Job(Generic[_R]):
    """Work for a control request that runs in the imports nursery, not in the request:
    every request with its id waits on it (``outcome``) and hears its progress."""

    digest: bytes
    finished: trio.Event = field(default_factory=trio.Event)
    error: GoqdError | None = None
    result: _R | None = None
    progress: p.Progress | None = None
    # The ReportProgress of every request waiting on it; each only keeps the latest.
    listeners: list[p.ReportProgress] = field(default_factory=list)

    def report(self, progress: p.Progress) -> None:
        self.progress = progress
        for listener in self.listeners:
            listener(progress)

    async def follow(self, report: p.ReportProgress) -> None:
        """Wait until the work is finished, telling ``report`` how far it has got (where
        it stands first: a retry joins work that is under way)."""
        self.listeners.append(report)
        try:
            if self.progress is not None:
                report(self.progress)
            await self.finished.wait()
        finally:
            self.listeners.remove(report)

    async def outcome(self, report: p.ReportProgress, *, stopped: str) -> _R:
        """Its result once finished (its error raised); ``stopped`` is the error if the
        daemon stopped it first."""
        await self.follow(report)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise LedgerError(stopped)
        return self.result


@dataclass
class _StockImport(_Job[m.Done]):
    """A stock import this daemon is working on."""


@dataclass
class _ListingImport(_Job[m.LinkReport]):
    """An import of a store's listings, running or among the last finished."""


def _import_digest(store: str, csv_text: str | None, create_products: bool) -> bytes:
    """What an import asked for, to tell a retry from another import under its id."""
    h = hashlib.sha256(msgspec.json.encode([store, create_products, csv_text is None]))
    if csv_text is not None:
        h.update(_digest(csv_text))
    return h.digest()


def _chunk_request_id(request_id: str, keys: tuple[str, ...]) -> str:
    """The ledger request id of one chunk of a request's work: "" (no deduplication)
    for a request without an id."""
    if not request_id:
        return ""
    return f"{request_id}/{hashlib.sha256(msgspec.json.encode(keys)).hexdigest()[:32]}"


def _digest(text: str) -> bytes:
    """SHA-256 of the CSV text, a slice at a time (no second full copy of a large file)."""
    h = hashlib.sha256()
    for start in range(0, len(text), 1 << 20):
        h.update(text[start : start + (1 << 20)].encode("utf-8", "surrogatepass"))
    return h.digest()


async def _read_listings_csv(text: str, *, where: str) -> list[tuple[int, bytes]]:
    """Check a whole listings CSV in worker threads; its listings, IMPORT_CHUNK a blob
    (with the number of listings in it).

    msgpack blobs, not Structs: a 900,000-row file is held as about its own size in
    bytes until each chunk is applied, not as a million Python objects.
    """
    reader = await trio.to_thread.run_sync(functools.partial(ListingsReader, text, where=where))
    blobs: list[tuple[int, bytes]] = []
    while more := await trio.to_thread.run_sync(_encode_listings, reader):
        blobs.extend(more)
    return blobs


def _encode_listings(reader: ListingsReader) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for _ in range(_READ_CHUNKS):
        chunk = reader.read(IMPORT_CHUNK)
        if not chunk:
            break
        out.append((len(chunk), _listings_encoder.encode(chunk)))
    return out


def _add_reports(a: m.LinkReport | None, b: m.LinkReport) -> m.LinkReport:
    if a is None:
        return b
    return m.LinkReport(
        store=a.store,
        seen=a.seen + b.seen,
        created=a.created + b.created,
        new_listings=a.new_listings + b.new_listings,
        updated=a.updated + b.updated,
        linked=a.linked + b.linked,
        unlinked=a.unlinked + b.unlinked,
        ambiguous=a.ambiguous + b.ambiguous,
        released=a.released + b.released,
        problems=(a.problems + b.problems)[:100],
        count_unknown=a.count_unknown + b.count_unknown,
    )


class _AdapterSession:
    """A short-lived adapter for operator work (key test, diff) outside the store actor."""

    def __init__(self, daemon: Daemon, cfg: StoreConfig, creds: dict[str, Secret]) -> None:
        self.daemon = daemon
        self.cfg = cfg
        self.creds = creds
        self.http: httpx.AsyncClient | None = None
        self.transport: MallTransport | None = None

    def not_found(self) -> str | None:
        """The last request of this session the mall answered 404 ("GET /path")."""
        return self.transport.not_found if self.transport is not None else None

    async def __aenter__(self) -> Any:
        spec = MALLS[self.cfg.mall]
        handle = self.daemon.handles[self.cfg.name]
        # The store's own transport: the mall's clock measured (a Yahoo key test signs by
        # it), stale pooled connections retried, 404s remembered (``not_found``).
        self.transport = mall_transport(
            transport=self.daemon.transport,
            verify=tls_context(),
            clock=self.daemon.clock,
            mall_clock=handle.mall_clock,
        )
        self.http = open_mall_client(self.transport, timeout=self.cfg.timeout_seconds)
        keeper = handle.credential_keeper
        ctx = StoreContext(
            store=self.cfg.name,
            mall=self.cfg.mall,
            base_url=self.cfg.base_url.rstrip("/"),
            credentials=self.creds,
            http=self.http,
            clock=self.daemon.clock,
            live_statuses=self.cfg.live_statuses or spec.default_live_statuses,
            cancel_statuses=self.cfg.cancel_statuses or spec.default_cancel_statuses,
            options=dict(self.cfg.options),
            urls=dict(self.cfg.urls),
            rate_buckets=handle.rate_buckets,
            mall_clock=handle.mall_clock,
            # A credential under test (key set) is stored by key_set once it works.
            save_credentials=keeper.save
            if keeper is not None and self.creds is handle.credentials
            else None,
        )
        return spec.open_adapter(ctx)

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.aclose()


async def _optional_expiry(adapter: Any) -> float | None:
    try:
        return await adapter.credential_expiry()  # type: ignore[no-any-return]
    except MallError:
        return None


def _load_for_reload(running: Config) -> tuple[Config, ReloadPlan]:
    """The config file as ``goqd run`` would start with it, checked the same way, and
    what it changes in ``running``. Blocking file I/O: run it in a worker thread."""
    loaded = load_config(running.source)
    check_host(loaded)
    return loaded, plan_reload(running, loaded)


def _read_credentials(loaded: Config, applied: Config) -> dict[str, dict[str, Secret]]:
    """Every credential of ``loaded``, read and checked as at start (one bad file refuses
    the reload), returned for the running stores of ``applied`` that read it from the
    same file (not so when the mall or the state directory changed: both wait for the
    restart). Blocking file I/O: run it in a worker thread."""
    running = {s.name: s for s in applied.stores}
    fresh: dict[str, dict[str, Secret]] = {}
    for store in loaded.stores:
        creds = load_credentials(loaded, store)
        now = running.get(store.name)
        if (
            now is not None
            and now.mall == store.mall
            and credential_path(applied, now) == credential_path(loaded, store)
        ):
            fresh[store.name] = creds
    return fresh


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


class _NotFound(GoqdError):
    pass


class _Unsupported(GoqdError):
    def __init__(self, name: str) -> None:
        super().__init__(f"request {name!r} is not served by this goqd version")


async def run_daemon(
    config: Config,
    *,
    clock: WallClock = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
    webhooks: Mapping[str, Webhook] | None = None,
    credentials: Mapping[str, dict[str, Secret]] | None = None,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled. ``started()`` gets the ``Daemon`` when READY.

    Credentials are read (and checked) before anything starts, so a missing or
    world-readable file refuses the start with the file's name (docs/reliability.md K2). So are
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
    hooks = dict(webhooks or {})
    for store in config.stores:
        check = MALLS[store.mall].webhook
        if check is not None:
            hooks.setdefault(store.name, _webhook_handler(daemon, store.name, check))
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
        await root.start(daemon.run_stock_imports)
        # All at once: each store reads its cursor from the ledger before it is started;
        # one at a time, each read queued behind the polls of the stores already going.
        async with trio.open_nursery() as starting:
            for store in config.stores:
                starting.start_soon(root.start, _supervise_store, daemon, store, transport, rng)
        await root.start(
            functools.partial(
                serve_control,
                config.daemon.control_socket,
                WithProgress(daemon.handle_control),
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
    poll, which books nothing twice (D3)."""

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
        handle.set_state("down", level=8, message=f"gave up after repeated crashes: {error!r}")

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
