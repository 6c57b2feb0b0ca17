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
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    load_credentials,
    parse_credentials,
    write_credentials,
)
from goqd.control import protocol as p
from goqd.control.server import PeerInfo, serve_control
from goqd.csvio import ListingsReader, StockReader
from goqd.errors import (
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
from goqd.malls.base import StoreContext, WebhookCheck, tls_context
from goqd.malls.registry import MALLS
from goqd.malls.transport import MallTransport, mall_transport, open_mall_client
from goqd.metrics import Metrics
from goqd.secret import Secret
from goqd.stores.actor import StoreHandle, run_store
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
    _import_nursery: trio.Nursery | None = field(default=None, repr=False)

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

    # ------------------------------------------------------------------ control

    def _handle(self, store: str) -> StoreHandle:
        try:
            return self.handles[store]
        except KeyError:
            raise _NotFound(f"no store named {store!r}; see `goqctl stores`") from None

    async def handle_control(self, req: p.ControlRequest, peer: PeerInfo) -> p.Ok | p.Err:
        """Answer one control request. Refusals are ``Err`` replies, never exceptions."""
        try:
            return p.Ok(result=await self._dispatch(req))
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

    async def _dispatch(self, req: p.ControlRequest) -> Any:
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
                    m.ListListings(store=req.store, after=req.after, limit=req.limit),
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
                return await self.diff(req.store)
            case p.Reflect():
                return await self.reflect(req.store, req.listing_keys, rid)
            case p.Import():
                return await self.import_store(req.store, req.csv_text)
            case p.LinkAuto():
                return await self.link_auto(req.store)
            case p.StockImport():
                return await self.stock_import(req.csv_text, rid)
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
        await trio.to_thread.run_sync(write_credentials, self.config, store, data)
        await self.ledger.call(m.ClearErrors(store=store, level=9, request_id=""))
        handle.credential_expires_at = expires
        handle.renew(creds)
        log.info("credential_renewed", store=store)
        return m.Done(changed=1, detail="credential stored; store resumed")

    def _adapter(self, cfg: StoreConfig, creds: dict[str, Secret]) -> _AdapterSession:
        return _AdapterSession(self, cfg, creds)

    async def diff(self, store: str) -> p.DiffReport:
        """差異商品: linked listings whose mall count differs from the ledger's."""
        handle = self._handle(store)
        cfg = self.config.store(store)
        spec = MALLS[cfg.mall]
        rows: list[p.DiffRow] = []
        checked = 0
        after = ""
        totals: dict[str, int] = {}
        async with self._adapter(cfg, handle.credentials) as adapter:
            while True:
                page = await self.ledger.ask(
                    m.ListListings(store=store, after=after, limit=spec.limits.read_batch),
                    m.ListingList,
                )
                if not page.listings:
                    break
                after = page.listings[-1].listing_key
                linked = [x for x in page.listings if x.link_state == "linked" and x.sku]
                if not linked:
                    continue
                counts = await adapter.read_stock([x.listing_key for x in linked])
                for x in linked:
                    assert x.sku is not None
                    if x.sku not in totals:
                        hist = await self.ledger.ask(m.GetHistory(sku=x.sku, limit=0), m.History)
                        # What goqd has the malls show: held units are sales a mall
                        # showed before its order API did.
                        totals[x.sku] = hist.total - hist.held
                    want = max(0, totals[x.sku])
                    have = counts.get(x.listing_key)
                    checked += 1
                    if have != want:
                        rows.append(
                            p.DiffRow(
                                listing_key=x.listing_key,
                                sku=x.sku,
                                ledger_quantity=want,
                                mall_quantity=have,
                            )
                        )
        return p.DiffReport(store=store, rows=tuple(rows), checked=checked)

    async def reflect(self, store: str, keys: tuple[str, ...], request_id: str) -> m.Done:
        """反映: queue the ledger's count for the given listings (every linked one if none).

        The pushes go out through the store actor like any other, within the mall's
        batch limit, so the operator never pages.
        """
        self._handle(store)
        return await self.ledger.ask(
            m.QueuePushes(store=store, listing_keys=keys, request_id=request_id), m.Done
        )

    async def import_store(self, store: str, csv_text: str | None) -> m.LinkReport:
        """Read every listing of ``store`` (its mall's API, or a goqd CSV) into the ledger.

        Importing the base store (基本モール) creates products; any other store links its
        listings by the link condition. Re-import updates listings, never duplicates.

        A CSV is read and checked whole in a worker thread (never on the event loop)
        before its first chunk is applied, so a bad row anywhere changes nothing. Each
        chunk of ``IMPORT_CHUNK`` listings is one ledger request: the watchdog, bookings
        and every store are answered between chunks.
        """
        self._handle(store)
        cfg = self.config.store(store)
        base = store == self.config.daemon.base_store
        total: m.LinkReport | None = None
        if csv_text is not None:
            for blob in await _read_listings_csv(csv_text, where=f"import CSV for {store}"):
                report = await self._import_chunk(cfg, base, _listings_decoder.decode(blob))
                total = _add_reports(total, report)
            return total if total is not None else await self._import_chunk(cfg, base, ())
        session = self._adapter(cfg, self.handles[store].credentials)
        try:
            async with session as adapter:
                chunk: list[m.MallListing] = []
                async for listing in adapter.iter_listings():
                    chunk.append(listing)
                    if len(chunk) >= IMPORT_CHUNK:
                        report = await self._import_chunk(cfg, base, tuple(chunk))
                        total = _add_reports(total, report)
                        chunk = []
                total = _add_reports(total, await self._import_chunk(cfg, base, tuple(chunk)))
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
        self, cfg: StoreConfig, base: bool, listings: tuple[m.MallListing, ...]
    ) -> m.LinkReport:
        return await self.ledger.ask(
            m.ImportListings(
                store=cfg.name,
                listings=listings,
                base=base,
                rules=tuple(cfg.link_normalize),
                default_lead_time=cfg.default_lead_time,
            ),
            m.LinkReport,
        )

    async def stock_import(self, csv_text: str, request_id: str) -> m.Done:
        """`goqctl stock import`: set or adjust totals from a stock CSV, every row or none.

        The file is read in a worker thread and staged in the ledger ``STAGE_CHUNK`` rows
        a request; once every row has passed its checks the import is sealed and applied
        ``APPLY_CHUNK`` rows a transaction, so the ledger goes on answering the watchdog,
        bookings and every store throughout. A sealed import is finished even if the
        daemon stops half-way (``run_stock_imports`` resumes it at the next start).

        The work runs in the imports nursery and this only waits for it: a goqctl that
        disconnects does not cut its import short, and a retry with the same request id
        waits for the same import (or gets its stored reply) instead of applying the
        file again. The same id with another file is refused.
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
            work = functools.partial(self._stage_stock_import, csv_text, request_id, digest)
            nursery.start_soon(self._run_stock_import, key, job, work)
        elif job.digest != digest:
            raise LedgerError(
                f"request id {request_id!r} is already importing a different stock CSV; "
                "nothing of this one was applied: send it with a new id"
            )
        await job.finished.wait()
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise LedgerError(
                "the daemon stopped before the stock import finished; if it was staged "
                "whole it is applied at the next start, else nothing of it was applied"
            )
        return job.result

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
                    work = functools.partial(self._apply_stock_import, job.import_id)
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

    async def _stage_stock_import(self, csv_text: str, request_id: str, digest: bytes) -> m.Done:
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
                while rows := await trio.to_thread.run_sync(reader.read, STAGE_CHUNK):
                    await led.ask(
                        m.StageStockRows(import_id=job.import_id, rows=tuple(rows), where=where),
                        m.Done,
                    )
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
        return await self._apply_stock_import(job.import_id)

    async def _apply_stock_import(self, import_id: int) -> m.Done:
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


IMPORT_CHUNK = 1000
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


@dataclass
class _StockImport:
    """A stock import this daemon is working on; every request with its id waits on it."""

    digest: bytes
    finished: trio.Event = field(default_factory=trio.Event)
    result: m.Done | None = None
    error: GoqdError | None = None


def _digest(text: str) -> bytes:
    """SHA-256 of the CSV text, a slice at a time (no second full copy of a large file)."""
    h = hashlib.sha256()
    for start in range(0, len(text), 1 << 20):
        h.update(text[start : start + (1 << 20)].encode("utf-8", "surrogatepass"))
    return h.digest()


async def _read_listings_csv(text: str, *, where: str) -> list[bytes]:
    """Check a whole listings CSV in worker threads; its listings, IMPORT_CHUNK a blob.

    msgpack blobs, not Structs: a 900,000-row file is held as about its own size in
    bytes until each chunk is applied, not as a million Python objects.
    """
    reader = await trio.to_thread.run_sync(functools.partial(ListingsReader, text, where=where))
    blobs: list[bytes] = []
    while more := await trio.to_thread.run_sync(_encode_listings, reader):
        blobs.extend(more)
    return blobs


def _encode_listings(reader: ListingsReader) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(_READ_CHUNKS):
        chunk = reader.read(IMPORT_CHUNK)
        if not chunk:
            break
        out.append(_listings_encoder.encode(chunk))
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
        daemon.handles[store.name] = StoreHandle(
            name=store.name, mall=store.mall, credentials=creds[store.name]
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
                daemon.handle_control,
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
