"""A real daemon (``rig.open_daemon``) in a trio run of its own thread.

For tests whose client side blocks (plain sockets, goqctl's ``call_sync``, Hypothesis
examples, which cannot be async): the daemon serves its control socket and ledger file
while the test's thread talks to them as any other process would.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import trio

from tests.helpers import rig


@contextlib.contextmanager
def daemon_in_thread(fleet: rig.Fleet, tmp: str, *, timeout: float = 60.0) -> Iterator[rig.Running]:
    """Start the daemon for ``fleet`` (state under ``tmp``, malls behind the in-process
    router, wall-clock time) and yield it once it is ready; stop it when the block ends.

    A daemon that fails to start, or whose run ends in an exception, fails the test in
    the test's own thread; so does one that is not ready, or not stopped, within
    ``timeout`` seconds.
    """
    router, urls = rig.router_for(fleet)
    ready = threading.Event()
    failed: list[BaseException] = []
    running: dict[str, Any] = {}

    async def main() -> None:
        async with rig.open_daemon(fleet, tmp, urls, transport=router, clock=time.time) as run:
            running["run"] = run
            running["token"] = trio.lowlevel.current_trio_token()
            running["stop"] = trio.Event()
            ready.set()
            await running["stop"].wait()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=thread_main, name="goqd-daemon", daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout), f"the daemon was not ready within {timeout:g} s"
        assert not failed, failed
        yield running["run"]
    finally:
        if "stop" in running:
            # The run may have ended already (the daemon failed): then failed says why.
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(running["stop"].set, trio_token=running["token"])
        thread.join(timeout)
    assert not thread.is_alive(), f"the daemon did not stop within {timeout:g} s"
    assert not failed, failed
