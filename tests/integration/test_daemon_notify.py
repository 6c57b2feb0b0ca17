"""The daemon's conversation with systemd, read on a datagram socket standing in for
$NOTIFY_SOCKET: READY=1 only once the ledger, control server and every store have
started; WATCHDOG=1 while the ledger answers; STOPPING=1 when it shuts down."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
import trio

from goqd.app import Daemon, run_daemon
from goqd.config import Config, DaemonConfig, StoreConfig
from goqd.sim.http import serve_sim
from goqd.sim.rakuten import SimRakuten
from tests.helpers.daemon import (
    notify_listener,
    received,
)


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with notify_listener() as (sock, path):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # 0.4 s: pings every 0.2 s
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield sock


async def test_ready_watchdog_and_stopping(notify_socket: socket.socket, sock_dir: str) -> None:
    tmp = sock_dir
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sim = SimRakuten(shop_id="600001", clock=time.time)
            url = await nursery.start(serve_sim, sim.app)
            cred = os.path.join(tmp, "r.json")
            with open(os.open(cred, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                json.dump(sim.credentials(), f)
            config = Config(
                daemon=DaemonConfig(
                    state_dir=os.path.join(tmp, "state"),
                    control_socket=os.path.join(tmp, "ctl.sock"),
                    http_listen="127.0.0.1:0",
                ),
                stores=(StoreConfig(name="r", mall="rakuten", base_url=url, credentials=cred),),
            )
            assert received(notify_socket) == []
            async with trio.open_nursery() as inner:
                daemon: Daemon = await inner.start(run_daemon, config)
                first = received(notify_socket)
                # READY is the first thing said, and only now that start() returned:
                # the control socket and the HTTP listener exist.
                assert first and first[0].startswith("READY=1")
                assert os.path.exists(config.daemon.control_socket)
                assert daemon.http_url.startswith("http://127.0.0.1:")
                await trio.sleep(0.7)
                pings = [d for d in received(notify_socket) if d == "WATCHDOG=1"]
                assert len(pings) >= 2
                inner.cancel_scope.cancel()
            assert any(d.startswith("STOPPING=1") for d in received(notify_socket))
            nursery.cancel_scope.cancel()
