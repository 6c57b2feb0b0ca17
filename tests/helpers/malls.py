"""One mall under test: its simulator served on loopback, and adapters for it.

Every per-mall test file and the mall contract test set a mall up the same way: serve
the simulator on 127.0.0.1 (hypercorn, port 0), open one ``httpx.AsyncClient``, and
build a ``StoreContext`` from the credentials the simulator accepts. This module does
that once. It never reaches a real mall host: ``serve_sim`` binds loopback only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import trio

from goqd.malls.base import GuardedAdapter, MallAdapter, StoreContext
from goqd.malls.registry import MALLS
from goqd.secret import Secret
from goqd.sim.base import SimMall
from goqd.sim.http import serve_sim
from goqd.sim.registry import SIMS
from goqd.wallclock import WallClock

SimT = TypeVar("SimT", bound=SimMall)


def store_context(
    mall: str,
    url: str,
    http: httpx.AsyncClient,
    clock: WallClock,
    credentials: Mapping[str, str],
    *,
    store: str = "",
    urls: Mapping[str, str] | None = None,
    live_statuses: tuple[str, ...] = (),
    options: Mapping[str, Any] | None = None,
) -> StoreContext:
    """A store of ``mall`` at ``url``; every credential value wrapped in ``Secret``."""
    return StoreContext(
        store=store or f"{mall}-store",
        mall=mall,
        base_url=url,
        credentials={k: Secret(v) for k, v in credentials.items()},
        http=http,
        clock=clock,
        live_statuses=live_statuses,
        options=dict(options or {}),
        urls=dict(urls or {}),
    )


@dataclass
class ServedMall(Generic[SimT]):
    """A simulator listening on loopback, and the client that talks to it."""

    sim: SimT
    url: str
    http: httpx.AsyncClient

    def context(
        self,
        *,
        store: str = "",
        credentials: Mapping[str, str] | None = None,
        urls: Mapping[str, str] | None = None,
        live_statuses: tuple[str, ...] = (),
        **options: Any,
    ) -> StoreContext:
        """A store of the simulated mall: the credentials the simulator accepts now
        unless others are given, and the simulator's clock."""
        return store_context(
            self.sim.mall,
            self.url,
            self.http,
            self.sim.wall_clock,
            self.sim.credentials() if credentials is None else credentials,
            store=store,
            urls=urls,
            live_statuses=live_statuses,
            options=options,
        )

    def registry_context(self, *, store: str = "") -> StoreContext:
        """A store as goqd's config would describe it for this simulator: the extra
        URLs (token endpoints on the same host) and options ``goqd.sim.registry``
        lists for the mall."""
        spec = SIMS[self.sim.mall]
        return store_context(
            self.sim.mall,
            self.url,
            self.http,
            self.sim.wall_clock,
            self.sim.credentials(),
            store=store,
            urls={name: self.url + path for name, path in spec.url_paths.items()},
            options=spec.options,
        )


def open_registered_adapter(ctx: StoreContext) -> MallAdapter:
    """The adapter ``goqd.malls.registry`` opens for ``ctx.mall``, without the guard.

    The registry wraps every adapter in ``GuardedAdapter``, which turns any exception
    into a ``MallProtocolError``; a test of the adapter's own error mapping must see
    what the adapter raises, or a ``KeyError`` on a strange body would pass as mapped.
    """
    adapter = MALLS[ctx.mall].open_adapter(ctx)
    return adapter.inner if isinstance(adapter, GuardedAdapter) else adapter


@asynccontextmanager
async def serve_mall(sim: SimT, *, http_timeout: float = 10.0) -> AsyncIterator[ServedMall[SimT]]:
    """Serve ``sim`` on 127.0.0.1 for the body of the ``async with``, with a client."""
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_sim, sim.app)
        async with httpx.AsyncClient(timeout=http_timeout) as http:
            yield ServedMall(sim, url, http)
        nursery.cancel_scope.cancel()


async def start_mall(
    nursery: trio.Nursery, sim: SimT, *, http_timeout: float = 10.0
) -> ServedMall[SimT]:
    """Serve ``sim`` in ``nursery`` (a test's fixture nursery) until it is cancelled;
    the client closes then too."""
    url: str = await nursery.start(serve_sim, sim.app)
    http = httpx.AsyncClient(timeout=http_timeout)
    nursery.start_soon(_close_when_cancelled, http)
    return ServedMall(sim, url, http)


async def _close_when_cancelled(http: httpx.AsyncClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await http.aclose()
