"""What the operator's parts see of the running daemon, and the mall sessions they open.

``DaemonView`` is the base of each part of the operator API (``Operator``, ``Imports``,
``Reconciler``): the daemon's configuration (a reload replaces it), ledger client and
store handles, read anew on every use; ``handle`` for a store an operator named;
``adapter`` for a short-lived mall session outside the store actor.

This module must never hold a copy of the configuration: a reload replaces it.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from goqd.config import Config, StoreConfig
from goqd.errors import NotFound
from goqd.ledger import LedgerClient
from goqd.malls.base import StoreContext, tls_context
from goqd.malls.registry import MALLS
from goqd.malls.transport import MallTransport, mall_transport, open_mall_client
from goqd.secret import Secret
from goqd.stores.actor import StoreHandle
from goqd.wallclock import WallClock


class DaemonState(Protocol):
    """What the operator reads of the running daemon (``goqd.app.Daemon``). A reload
    replaces ``config`` and sets the reload fields; the operator always reads them anew."""

    @property
    def version(self) -> str: ...
    @property
    def config(self) -> Config: ...
    @property
    def ledger(self) -> LedgerClient: ...
    @property
    def handles(self) -> dict[str, StoreHandle]: ...
    @property
    def clock(self) -> WallClock: ...
    @property
    def started_at(self) -> float: ...
    @property
    def transport(self) -> httpx.AsyncBaseTransport | None: ...
    @property
    def restart_needed(self) -> tuple[str, ...]: ...
    @property
    def reload_error(self) -> str: ...


class DaemonView:
    """The running daemon as the operator's parts read it."""

    def __init__(self, daemon: DaemonState) -> None:
        self.daemon = daemon

    @property
    def config(self) -> Config:
        return self.daemon.config

    @property
    def ledger(self) -> LedgerClient:
        return self.daemon.ledger

    @property
    def handles(self) -> dict[str, StoreHandle]:
        return self.daemon.handles

    @property
    def clock(self) -> WallClock:
        return self.daemon.clock

    def handle(self, store: str) -> StoreHandle:
        """The handle of a configured store; ``NotFound`` for any other name."""
        try:
            return self.handles[store]
        except KeyError:
            raise NotFound(f"no store named {store!r}; see `goqctl stores`") from None

    def adapter(self, cfg: StoreConfig, creds: dict[str, Secret]) -> AdapterSession:
        return AdapterSession(self.daemon, cfg, creds)


class AdapterSession:
    """A short-lived adapter for operator work (key test, diff) outside the store actor."""

    def __init__(self, daemon: DaemonState, cfg: StoreConfig, creds: dict[str, Secret]) -> None:
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
