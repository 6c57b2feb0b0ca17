"""The operator API: what each control request does, as a table from request type to handler.

``serve_control`` decodes and checks a request and hands it to ``Operator.handle_control``,
which looks its type up in ``HANDLERS``. A request that is a ledger request as it stands
(``goqd.messages._OperatorRequest``: ``stock_set``, ``errors``, ``link_listing``, ...)
has a ``_ledger`` row: the row names the ledger's reply type, whether ``store`` must name
a configured store, which ledger refusals mean ``not_found``, and what to do after. The
other requests (status, key set, import, diff, reflect, stock import, ...) have a handler
of their own. Adding a one-to-one operator command is its message in ``goqd.messages``,
the ledger's handling of it, its goqctl command and one row here.

The long requests tell the request's ``ReportProgress`` how far they have got: imports
(``goqd.control.imports``) run as jobs in the imports nursery, so a goqctl that goes
away does not cut them short and a retry with the same request id waits for the same
job instead of running it twice; diff and reflect are ``goqd.control.reconcile``'s.

This module must never raise a refusal at the control server: every refusal becomes an
``Err`` reply here, and only a bug reaches the server (answered ``internal``). It must
never log or echo a credential (``KeySet``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
import trio

from goqd import expiry
from goqd import messages as m
from goqd.config import parse_credentials, write_credentials
from goqd.control import protocol as p
from goqd.control.imports import API_NOT_ENABLED, Imports, add_reports
from goqd.control.reconcile import Reconciler
from goqd.control.server import PeerInfo
from goqd.control.state import DaemonState, DaemonView
from goqd.errors import (
    LEVEL_CREDENTIAL,
    GoqdError,
    InputError,
    LedgerRequestFailed,
    LedgerUnavailable,
    MallAuthError,
    MallError,
    NotFound,
    UnknownListing,
    UnknownSku,
)
from goqd.malls.registry import MALLS
from goqd.stores.actor import StoreHandle

log = structlog.get_logger("goqd.control.operator")


class Operator(DaemonView):
    """The operator API of a running daemon: answers control requests (``handle_control``);
    its ``imports`` run in the imports nursery (``Imports.run_stock_imports``)."""

    def __init__(self, daemon: DaemonState) -> None:
        super().__init__(daemon)
        self.imports = Imports(daemon)
        self.reconciler = Reconciler(daemon)

    # ------------------------------------------------------------------ requests

    async def handle_control(
        self, req: p.ControlRequest, peer: PeerInfo, report: p.ReportProgress = p.no_progress
    ) -> p.Ok | p.Err:
        """Answer one control request. Refusals are ``Err`` replies, never exceptions.

        The long ones (import, diff, reflect, stock import) tell ``report`` how far they
        have got as they go."""
        try:
            handler = HANDLERS.get(type(req))
            if handler is None:
                raise _Unsupported(type(req).__name__)
            return p.Ok(result=await handler(self, req, report))
        except NotFound as exc:
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

    async def ask_ledger(self, req: m.LedgerRequest, row: _LedgerRow) -> p.ControlResult:
        """A ledger request from goqctl, as decoded, checked as its row says."""
        store = getattr(req, "store", "")
        if row.known_store and store:
            # A store not in the config would get rows nothing ever removes.
            self.handle(store)
        try:
            result: p.ControlResult = await self.ledger.ask(req, row.reply)
        except row.not_found as exc:
            raise NotFound(str(exc)) from None
        if row.then is not None:
            await row.then(self)
        return result

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
            version=self.daemon.version,
            started_at=self.daemon.started_at,
            uptime_s=now - self.daemon.started_at,
            stores=await self.store_infos(ledger.stores),
            ledger=ledger,
            restart_needed=self.daemon.restart_needed,
            reload_error=self.daemon.reload_error,
        )

    # ------------------------------------------------------------------ operations

    async def resume_cleared(self) -> None:
        """A store stopped for its credential resumes once its level-9 errors are all
        cleared: clearing them is the operator's word that the credential was fixed."""
        for name, handle in self.handles.items():
            if handle.state != "stopped":
                continue
            errors = await self.ledger.ask(
                m.ListErrors(store=name, level=LEVEL_CREDENTIAL, limit=1), m.ErrorList
            )
            if not errors.errors:
                log.info("store_resumed", store=name, reason="level-9 errors cleared")
                handle.resume()

    async def key_set(self, store: str, data: dict[str, str]) -> m.Done:
        """Test a new credential against the mall; on success store it and resume."""
        handle = self.handle(store)
        cfg = self.config.store(store)
        spec = MALLS[cfg.mall]
        creds = parse_credentials(f"key set {store}", cfg.mall, data, spec.credential_fields)
        async with self.adapter(cfg, creds) as adapter:
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
            await self.ledger.call(
                m.ClearErrors(store=store, level=LEVEL_CREDENTIAL, request_id="")
            )
            handle.credential_expires_at = expires
            handle.renew(creds)
        log.info("credential_renewed", store=store)
        return m.Done(changed=1, detail="credential stored; store resumed")

    async def link_auto(self, store: str) -> m.LinkReport:
        """`goqctl link --auto [STORE]`: link what the link condition now matches."""
        stores = [store] if store else list(self.handles)
        total: m.LinkReport | None = None
        for name in stores:
            cfg = self.config.store(self.handle(name).name)
            report = await self.ledger.ask(
                m.AutoLink(store=name, rules=tuple(cfg.link_normalize)), m.LinkReport
            )
            total = add_reports(total, report)
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


# --------------------------------------------------------------------------------------
# The table: what each control request does
# --------------------------------------------------------------------------------------

Handler = Callable[[Operator, Any, p.ReportProgress], Awaitable[p.ControlResult]]


@dataclass(frozen=True)
class _LedgerRow:
    """How a request that is a ledger request as it stands is answered: the ledger's
    ``reply`` type; with ``known_store``, a ``store`` it names must be a configured store
    (an empty one means every store); ``not_found``: the ledger refusals that mean the
    thing named does not exist; ``then``: what to do once the ledger has answered."""

    reply: type[Any]
    known_store: bool = False
    not_found: tuple[type[Exception], ...] = ()
    then: Callable[[Operator], Awaitable[None]] | None = None


def _ledger(
    reply: type[Any],
    *,
    known_store: bool = False,
    not_found: tuple[type[Exception], ...] = (),
    then: Callable[[Operator], Awaitable[None]] | None = None,
) -> Handler:
    row = _LedgerRow(reply, known_store, not_found, then)

    async def handle(op: Operator, req: Any, report: p.ReportProgress) -> p.ControlResult:
        return await op.ask_ledger(req, row)

    return handle


async def _status(op: Operator, req: p.Status, report: p.ReportProgress) -> p.DaemonStatus:
    return await op.status()


async def _stores(op: Operator, req: p.Stores, report: p.ReportProgress) -> p.StoreList:
    return p.StoreList(stores=await op.store_infos())


async def _key_set(op: Operator, req: p.KeySet, report: p.ReportProgress) -> m.Done:
    return await op.key_set(req.store, req.credentials)


async def _pause(op: Operator, req: p.Pause, report: p.ReportProgress) -> m.Done:
    op.handle(req.store).pause()
    return m.Done(changed=1)


async def _resume(op: Operator, req: p.Resume, report: p.ReportProgress) -> m.Done:
    op.handle(req.store).resume()
    return m.Done(changed=1)


async def _poll_now(op: Operator, req: p.PollNow, report: p.ReportProgress) -> m.Done:
    op.handle(req.store).request_poll()
    return m.Done(changed=1)


async def _link_auto(op: Operator, req: p.LinkAuto, report: p.ReportProgress) -> m.LinkReport:
    return await op.link_auto(req.store)


async def _product_add(op: Operator, req: p.ProductAdd, report: p.ReportProgress) -> m.ProductAdded:
    return await op.product_add(req.sku, req.quantity, req.name, req.request_id)


async def _import(op: Operator, req: p.Import, report: p.ReportProgress) -> m.LinkReport:
    return await op.imports.import_store(
        req.store,
        req.csv_text,
        create_products=req.create_products,
        request_id=req.request_id,
        report=report,
    )


async def _diff(op: Operator, req: p.Diff, report: p.ReportProgress) -> p.DiffReport:
    return await op.reconciler.diff(req.store, report=report)


async def _reflect(op: Operator, req: p.Reflect, report: p.ReportProgress) -> m.Done:
    return await op.reconciler.reflect(
        req.store, req.listing_keys, req.request_id, req.differing, report=report
    )


async def _stock_import(op: Operator, req: p.StockImport, report: p.ReportProgress) -> m.Done:
    return await op.imports.stock_import(req.csv_text, req.request_id, report=report)


HANDLERS: dict[type[Any], Handler] = {
    # Ledger requests goqctl sends as they are: one row each.
    m.ListErrors: _ledger(m.ErrorList, known_store=True),
    m.ListParked: _ledger(m.ParkedList, known_store=True),
    m.ClearErrors: _ledger(m.Done, then=Operator.resume_cleared),
    m.ListProducts: _ledger(m.ProductList),
    m.ListListings: _ledger(m.ListingList, known_store=True),
    m.Link: _ledger(m.Done, known_store=True, not_found=(UnknownListing, UnknownSku)),
    m.Unlink: _ledger(m.Done, known_store=True, not_found=(UnknownListing,)),
    m.SetStock: _ledger(m.StockChanged),
    m.AdjustStock: _ledger(m.StockChanged),
    m.GetHistory: _ledger(m.History),
    m.SetListingAttrs: _ledger(m.Done),
    m.DeleteProduct: _ledger(m.Done),
    # Requests that need the configuration, a mall session, a store or several
    # ledger requests.
    p.Status: _status,
    p.Stores: _stores,
    p.KeySet: _key_set,
    p.Pause: _pause,
    p.Resume: _resume,
    p.PollNow: _poll_now,
    p.LinkAuto: _link_auto,
    p.ProductAdd: _product_add,
    p.Import: _import,
    p.Diff: _diff,
    p.Reflect: _reflect,
    p.StockImport: _stock_import,
}


async def _optional_expiry(adapter: Any) -> float | None:
    try:
        return await adapter.credential_expiry()  # type: ignore[no-any-return]
    except MallError:
        return None


# Private: raised and answered (``conflict``) within ``handle_control``, so it never
# leaves this module. It stands for a request type the protocol decodes and this table
# has no row for (a row forgotten when a request was added).
class _Unsupported(GoqdError):
    def __init__(self, name: str) -> None:
        super().__init__(f"request {name!r} is not served by this goqd version")
