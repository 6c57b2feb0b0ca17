"""The simulated fleet: simulated malls served on 127.0.0.1, and the store and daemon
config that points a real daemon at them.

One chain, written once: simulators → served on loopback → one ``StoreConfig`` per
store (its mall's extra URLs and options from the simulator registry, its credential
in a 0600 file or handed over in memory) → the daemon's ``Config`` under a temporary
directory → ``run_daemon``. The demo, the market benchmark, the tests' reliability rig
and the end-to-end tests all build their daemons this way, so a mall's settings are
wired in one place.

``SimulatedTime`` is the fast clock the demo and the benchmark run the whole fleet on.

What it must never do: listen beyond loopback or talk to a real mall. ``goqd run``
never imports it (tests/runtime/test_runtime_imports.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
import trio.testing

from goqd.config import (
    Config,
    DaemonConfig,
    StoreConfig,
    parse_credentials,
    write_credential_file,
)
from goqd.malls.registry import MALLS
from goqd.secret import Secret
from goqd.sim.base import SimMall
from goqd.sim.http import serve_sim
from goqd.sim.registry import SIMS
from goqd.wallclock import WallClock

_T = TypeVar("_T")


def available_malls() -> list[str]:
    """Malls that have both a simulator and an adapter, in registry order."""
    return [mall for mall in SIMS if mall in MALLS]


def make_sims(
    stores: Sequence[tuple[str, str]],
    *,
    clock: WallClock,
    seeds: Sequence[int],
    first_shop: int = 300000,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, SimMall]:
    """One simulator per ``(store, mall)``: shop ids counted from ``first_shop``, seeds
    in store order, ``options`` (by mall) passed to the simulator's constructor."""
    sims: dict[str, SimMall] = {}
    for n, ((store, mall), seed) in enumerate(zip(stores, seeds, strict=True)):
        extra = dict((options or {}).get(mall, {}))
        sims[store] = SIMS[mall].cls(shop_id=f"{first_shop + n}", clock=clock, seed=seed, **extra)
    return sims


def write_credentials(path: str, data: Mapping[str, str]) -> str:
    """Write the credential file ``<dir>/<store>.json`` as goqd writes a renewed one
    (``write_credential_file``): 0600 from its first byte (goqd refuses a file others can
    read) and replaced whole, so a reload that reads it sees the old file or the new."""
    directory, name = os.path.split(path)
    store, ext = os.path.splitext(name)
    if ext != ".json":
        raise ValueError(f"a credential file is named <store>.json, not {name!r}")
    return write_credential_file(directory or ".", store, dict(data))


def store_config(
    store: str,
    mall: str,
    url: str,
    *,
    credentials: str,
    options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> StoreConfig:
    """Store ``store`` of ``mall`` served at ``url``: the simulator's extra endpoints
    (token URLs) under the same base, the mall's options from the simulator registry,
    overridden by ``options``; ``settings`` are any other ``StoreConfig`` fields."""
    spec = SIMS[mall]
    return StoreConfig(
        name=store,
        mall=mall,
        base_url=url,
        credentials=credentials,
        urls={key: url + path for key, path in spec.url_paths.items()},
        options={**spec.options, **(options or {})},
        **settings,
    )


def sim_credentials(store: str, mall: str, data: Mapping[str, str]) -> dict[str, Secret]:
    """A simulator's credential as ``run_daemon(credentials=...)`` takes it, checked as
    a credential file would be."""
    return parse_credentials(store, mall, dict(data), MALLS[mall].credential_fields)


def daemon_config(
    tmp: str, stores: Sequence[StoreConfig], *, source: str | None = None, **daemon: Any
) -> Config:
    """The daemon's config under ``tmp``: state in ``tmp/state``, the control socket
    ``tmp/ctl.sock`` (short: a socket path has at most 107 bytes), HTTP on a free
    loopback port; ``daemon`` overrides any ``DaemonConfig`` field. ``source`` is the
    file the config counts as read from (default ``tmp/goqd.toml``)."""
    settings: dict[str, Any] = {
        "state_dir": os.path.join(tmp, "state"),
        "control_socket": os.path.join(tmp, "ctl.sock"),
        "http_listen": "127.0.0.1:0",
        **daemon,
    }
    return Config(
        daemon=DaemonConfig(**settings),
        stores=tuple(stores),
        source=source or os.path.join(tmp, "goqd.toml"),
    )


@dataclass
class Fleet:
    """Simulators by store, and where each is reached."""

    sims: dict[str, SimMall]
    urls: dict[str, str]  # store -> base URL

    def credentials(self) -> dict[str, dict[str, Secret]]:
        """Every store's credential, for ``run_daemon(credentials=...)``."""
        return {
            store: sim_credentials(store, sim.mall, sim.credentials())
            for store, sim in self.sims.items()
        }

    def config(
        self,
        tmp: str,
        *,
        credential_files: bool = True,
        per_store: Mapping[str, Mapping[str, Any]] | None = None,
        daemon: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> Config:
        """The daemon's config for every store of the fleet (``daemon_config``).

        Credentials are written to ``tmp/etc/<store>.json`` (0600), or with
        ``credential_files=False`` only named there, for a caller that hands
        ``credentials()`` to ``run_daemon``. ``settings`` apply to every store,
        ``per_store`` (by store name; ``options`` merged over the mall's) to one.
        """
        etc = os.path.join(tmp, "etc")
        os.makedirs(etc, exist_ok=True)
        stores = []
        for store, sim in self.sims.items():
            path = os.path.join(etc, f"{store}.json")
            if credential_files:
                write_credentials(path, sim.credentials())
            stores.append(
                store_config(
                    store,
                    sim.mall,
                    self.urls[store],
                    credentials=path,
                    **{**settings, **(per_store or {}).get(store, {})},
                )
            )
        return daemon_config(tmp, stores, source=os.path.join(etc, "goqd.toml"), **(daemon or {}))


async def serve_sims(nursery: trio.Nursery, sims: Mapping[str, SimMall]) -> dict[str, str]:
    """Serve every simulator in ``nursery`` on its own free loopback port; store -> URL."""
    return {store: await nursery.start(serve_sim, sim.app) for store, sim in sims.items()}


@contextlib.asynccontextmanager
async def open_fleet(sims: Mapping[str, SimMall]) -> AsyncIterator[Fleet]:
    """Serve ``sims`` (store -> simulator) on 127.0.0.1 for the duration of the block.

    Resource handling: the servers run in a nursery of their own, cancelled when the
    block ends; run the daemon inside the block so it stops first.
    """
    async with trio.open_nursery() as nursery:
        yield Fleet(dict(sims), await serve_sims(nursery, sims))
        nursery.cancel_scope.cancel()


class SimulatedTime:
    """A trio ``MockClock`` running ``speed`` simulated seconds per real second, and
    the wall clock that goes with it, ``epoch`` + simulated seconds, for everything
    that reads a wall clock in the run (daemon, simulators, ledger, market).

    Shared by ``goqd sim`` and ``goqd demo``: delays a mall imposes (Amazon shows an
    order about two minutes late) stay what they are in simulated time, while the run
    takes ``1 / speed`` of the real time. Real HTTP and SQLite work still costs real
    time, which the fast clock multiplies by ``speed``.
    """

    def __init__(self, speed: float, epoch: float | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be more than 0, not {speed:g}")
        self.speed = speed
        self.epoch = float(int(time.time())) if epoch is None else epoch
        self.mock = trio.testing.MockClock(rate=speed)

    def wall(self) -> float:
        # Read from the clock object, not trio.current_time(): the ledger calls this on
        # its worker thread, where trio.current_time() raises.
        return self.epoch + self.mock.current_time()

    def run(self, async_fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``trio.run(async_fn, *args)`` on this clock."""
        return trio.run(async_fn, *args, clock=self.mock)
