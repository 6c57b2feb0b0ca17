"""``python -m goqd.tools.importbench``: a large ``goqctl stock import`` against a real daemon.

Starts ``goqd run`` as a child process on a temporary ledger seeded with ``--rows``
products (each linked to one listing, as a base-store import leaves them), sends one
stock CSV of that many rows over the control socket, and meanwhile asks ``/healthz``
(the watchdog's liveness check: it answers only when the ledger does) and ``/metrics``
(answered by the event loop alone) every 0.5 s. It prints:

* ``import_s``: from sending the request to its reply;
* ``longest_health_gap_s``: the longest time between two good ``/healthz`` answers
  while the import ran, which is what systemd's watchdog would see (``WatchdogSec=30``);
* ``health_failures``: ``/healthz`` answers that were not 200 (or timed out, at 10 s);
* ``max_metrics_latency_s``: the slowest ``/metrics`` answer, the event loop's longest
  stall as a client sees it;
* ``peak_rss_mb``: the daemon's peak resident memory (``VmHWM``).

``--tree DIR`` runs the daemon from another checkout (``git worktree add``) to compare
before and after; the ledger is then seeded by that checkout's own ``open_db``.

This is a benchmark: it prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from goqd.control import protocol as p
from goqd.control.client import call
from goqd.errors import ControlError

ROOT = Path(__file__).resolve().parents[2]
PROBE_EVERY_S = 0.5

# Run by the daemon's own interpreter, in the checkout being measured (``--tree``, an
# older one perhaps): bulk rows through that checkout's ``open_db``, as an import would
# leave them. Raw SQL on purpose: the ledger has no bulk-load request.
_SEED = """
import sys
from goqd.ledger import open_db
path, n = sys.argv[1], int(sys.argv[2])
conn = open_db(path)
conn.execute("BEGIN")
conn.executemany(
    "INSERT INTO products (sku, name, total, first_store, created_at, code_fold) "
    "VALUES (?, ?, 100, 'base', 0, lower(?))",
    ((f"SKU-{i:07d}", f"product {i}", f"sku{i:07d}") for i in range(n)),
)
conn.executemany(
    "INSERT INTO listings (store, listing_key, link_code, sku, link_state) "
    "VALUES ('base', ?, ?, ?, 'linked')",
    ((f"item/{i:07d}", f"SKU-{i:07d}", f"SKU-{i:07d}") for i in range(n)),
)
conn.execute("COMMIT")
conn.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _probe(
    client: httpx.AsyncClient, url: str, stop: trio.Event, out: dict[str, Any]
) -> None:
    """GET ``url`` every PROBE_EVERY_S until ``stop``; record latencies and good answers."""
    while not stop.is_set():
        started = time.monotonic()
        ok = False
        try:
            response = await client.get(url, timeout=10.0)
            ok = response.status_code == 200
        except httpx.HTTPError:
            pass
        done = time.monotonic()
        out["latencies"].append(done - started)
        if ok:
            out["good"].append(done)
        else:
            out["failures"] += 1
        with trio.move_on_after(max(0.0, PROBE_EVERY_S - (done - started))):
            await stop.wait()


def run_bench(rows: int, mode: str, tree: Path, keep: bool) -> dict[str, Any]:
    """Seed, start the daemon, measure one import (``_measure``), stop the daemon."""
    tmp = tempfile.mkdtemp(prefix="goqd-impbench-", dir="/tmp")
    state = os.path.join(tmp, "state")
    os.makedirs(state)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("GOQD_CRASHPOINT", None)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _SEED, os.path.join(state, "goqd.db"), str(rows)],
        check=True,
        cwd=tree,
        env=env,
    )
    seed_s = time.perf_counter() - t0
    port = _free_port()
    sock = os.path.join(tmp, "ctl.sock")
    config = os.path.join(tmp, "goqd.toml")
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f'[daemon]\nstate-dir = "{state}"\ncontrol-socket = "{sock}"\n'
            f'http-listen = "127.0.0.1:{port}"\nlog-level = "warning"\n'
        )
    column = "quantity" if mode == "set" else "delta"
    csv_text = f"sku,{column}\n" + "".join(f"SKU-{i:07d},{i % 50}\n" for i in range(rows))
    result: dict[str, Any] = {
        "rows": rows,
        "mode": mode,
        "tree": str(tree),
        "seed_s": round(seed_s, 1),
    }
    with open(os.path.join(tmp, "goqd.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "goqd.cli.goqd", "run", "--config", config],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        result.update(trio.run(_measure, proc, sock, port, csv_text))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if keep:
            result["dir"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


async def _measure(
    proc: subprocess.Popen[bytes], sock: str, port: int, csv_text: str
) -> dict[str, Any]:
    with trio.fail_after(120):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"goqd exited with {proc.returncode} before it was ready")
            try:
                await call(sock, p.Stores(), timeout=5.0)
                break
            except ControlError:
                await trio.sleep(0.2)
    health: dict[str, Any] = {"latencies": [], "good": [], "failures": 0}
    metrics: dict[str, Any] = {"latencies": [], "good": [], "failures": 0}
    stop = trio.Event()
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        base = f"http://127.0.0.1:{port}"
        nursery.start_soon(_probe, client, base + "/healthz", stop, health)
        nursery.start_soon(_probe, client, base + "/metrics", stop, metrics)
        await trio.sleep(1.0)  # a baseline of good answers before the import
        started = time.monotonic()
        reply = await call(sock, p.StockImport(csv_text=csv_text), timeout=3600.0)
        finished = time.monotonic()
        await trio.sleep(1.0)
        stop.set()
    # Intervals between consecutive good answers that overlap the import.
    good = sorted(health["good"])
    gaps = [b - a for a, b in itertools.pairwise(good) if b >= started and a <= finished]
    if not good or good[-1] < finished:
        gaps.append(finished - (good[-1] if good else started))
    return {
        "reply": str(reply),
        "import_s": round(finished - started, 2),
        "longest_health_gap_s": round(max(gaps), 2),
        "health_failures": health["failures"],
        "max_health_latency_s": round(max(health["latencies"]), 2),
        "max_metrics_latency_s": round(max(metrics["latencies"]), 2),
        "peak_rss_mb": round(_peak_rss_mb(proc.pid)),
        "daemon_alive": proc.poll() is None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m goqd.tools.importbench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=("set", "adjust"), default="set")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout to run goqd from")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (ledger, log)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run_bench(args.rows, args.mode, args.tree.resolve(), args.keep)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
