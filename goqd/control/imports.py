"""Imports for the operator: a store's listings (from its mall or a CSV) and stock CSVs.

Each import with a request id runs as a job in the imports nursery (``run_stock_imports``),
not in the control request: a goqctl that goes away does not cut it short, and a request
with the same id waits for that job (and gets its result) instead of importing twice.
Every request waiting on a job hears its progress. Work is handed to the ledger a chunk
a request, so the watchdog, bookings and every store are answered in between.

This module must never apply part of a file that has a bad row: a CSV is checked whole
(listings) or staged whole (stock) before anything of it is applied.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec
import structlog
import trio

from goqd import messages as m
from goqd.config import StoreConfig
from goqd.control import protocol as p
from goqd.control.state import DaemonState, DaemonView
from goqd.csvio import ListingsReader, StockReader
from goqd.errors import GoqdError, LedgerError, LedgerUnavailable, MallError, MallProtocolError
from goqd.malls.registry import MALLS

log = structlog.get_logger("goqd.control.imports")

_R = TypeVar("_R")

# MallError.code of an import the mall answered 404: an API the shop has not enabled.
API_NOT_ENABLED = "api_not_enabled"


class Imports(DaemonView):
    """The imports of a running daemon and the nursery their jobs run in."""

    def __init__(self, daemon: DaemonState) -> None:
        super().__init__(daemon)
        # Stock imports in progress, by request id; listing imports by request id,
        # running and the last few finished (``import_store``); the nursery they run in
        # (``run_stock_imports``), ``None`` until it is open.
        self._stock_imports: dict[str, _Job[m.Done]] = {}
        self._listing_imports: dict[str, _Job[m.LinkReport]] = {}
        self._import_nursery: trio.Nursery | None = None

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
        self.handle(store)
        work = functools.partial(self._import_listings, store, csv_text, create_products)
        if self._import_nursery is None or not request_id:
            return await work(report)
        digest = await trio.to_thread.run_sync(_import_digest, store, csv_text, create_products)
        return await self._job(
            self._listing_imports,
            request_id,
            digest,
            work,
            report,
            keep=LISTING_IMPORTS_KEPT,
            name="the import",
            failed="listing_import_failed",
            other=f"request id {request_id!r} is already used for an import of another store "
            "or file; nothing of this one was applied: send it with a new id",
            stopped="the daemon stopped before the import finished; what was imported "
            "stays (an import can be run again: it updates, never duplicates)",
        )

    async def _job(
        self,
        jobs: dict[str, _Job[_R]],
        key: str,
        digest: bytes,
        work: Callable[[p.ReportProgress], Awaitable[_R]],
        report: p.ReportProgress,
        *,
        keep: int,
        name: str,
        failed: str,
        other: str,
        stopped: str,
    ) -> _R:
        """Start ``work`` in the imports nursery as the job ``key`` of ``jobs``, or join
        the job already there under that key, and wait for its outcome.

        A job under that key with another ``digest`` is another request sent with the
        same id: refused with ``other``, nothing of it applied. ``keep``, ``name`` and
        ``failed`` are ``_Job.run``'s; ``stopped`` is the error if the daemon stops
        before the job finishes."""
        nursery = self._import_nursery
        if nursery is None:
            raise LedgerUnavailable("the daemon is not taking imports yet")
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = _Job(digest=digest)
            nursery.start_soon(
                functools.partial(job.run, jobs, key, work, keep=keep, name=name, failed=failed)
            )
        elif job.digest != digest:
            raise LedgerError(other)
        return await job.outcome(report, stopped=stopped)

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
                total = add_reports(total, await import_chunk(_listings_decoder.decode(blob)))
                done += n
                report(p.Progress(phase="import", done=done, total=count, unit="listings"))
            return total if total is not None else await import_chunk(())
        session = self.adapter(cfg, self.handles[store].credentials)
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
                        total = add_reports(total, await import_chunk(tuple(chunk)))
                        chunk = []
                total = add_reports(total, await import_chunk(tuple(chunk)))
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
        if self._import_nursery is None:
            raise LedgerUnavailable("the daemon is not taking stock imports yet")
        digest = await trio.to_thread.run_sync(_digest, csv_text)
        return await self._job(
            self._stock_imports,
            request_id or f"anonymous-{uuid.uuid4().hex}",
            digest,
            functools.partial(self._stage_stock_import, csv_text, request_id, digest),
            report,
            keep=0,
            name="the stock import",
            failed="stock_import_failed",
            other=f"request id {request_id!r} is already importing a different stock CSV; "
            "nothing of this one was applied: send it with a new id",
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
                    entry = self._stock_imports[key] = _Job[m.Done](digest=job.digest)
                    log.info(
                        "stock_import_resumed",
                        import_id=job.import_id,
                        staged=job.staged,
                        applied=job.applied + job.skipped,
                    )
                    work = functools.partial(self._apply_stock_import, job.import_id)
                    nursery.start_soon(
                        functools.partial(
                            entry.run,
                            self._stock_imports,
                            key,
                            work,
                            keep=0,
                            name="the stock import",
                            failed="stock_import_failed",
                        )
                    )
                else:
                    nursery.start_soon(self._discard_stock_import, job.import_id)
            self._import_nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._import_nursery = None

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


IMPORT_CHUNK = 1000
# Finished listing imports kept, by request id, for a retry to get the same reply.
LISTING_IMPORTS_KEPT = 64
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

    async def run(
        self,
        jobs: dict[str, _Job[_R]],
        key: str,
        work: Callable[[p.ReportProgress], Awaitable[_R]],
        *,
        keep: int,
        name: str,
        failed: str,
    ) -> None:
        """Do ``work`` as the job ``key`` of ``jobs``, then forget it unless it succeeded
        and is among the last ``keep`` finished there: a retry of a failed job runs
        again, one of a kept job gets its result. ``name`` and ``failed`` (the log
        event) describe a bug met on the way.

        Error handling: the work's refusals and bugs become the job's error, never
        raised: every job runs in one nursery with the daemon's lifetime, and one job's
        bug is that job's error, not the daemon's end."""
        try:
            self.result = await work(self.report)
        except GoqdError as exc:
            self.error = exc
        # Broad on purpose: see "Error handling" above.
        except Exception:
            log.exception(failed)
            self.error = LedgerError(f"{name} failed with an internal error (logged as {failed})")
        finally:
            self.finished.set()
            if jobs.get(key) is self and (self.result is None or not keep):
                del jobs[key]
            done = [k for k, j in jobs.items() if j.finished.is_set()]
            for old in done[: max(0, len(done) - keep)]:
                del jobs[old]

    async def outcome(self, report: p.ReportProgress, *, stopped: str) -> _R:
        """Its result once finished (its error raised); ``stopped`` is the error if the
        daemon stopped it first."""
        await self.follow(report)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise LedgerError(stopped)
        return self.result


def _import_digest(store: str, csv_text: str | None, create_products: bool) -> bytes:
    """What an import asked for, to tell a retry from another import under its id."""
    h = hashlib.sha256(msgspec.json.encode([store, create_products, csv_text is None]))
    if csv_text is not None:
        h.update(_digest(csv_text))
    return h.digest()


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


def add_reports(a: m.LinkReport | None, b: m.LinkReport) -> m.LinkReport:
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
