"""Security checks (docs/reliability.md, "Security"): the credential canary over every output of
a real ``goqd run`` process for every mall, the control socket's mode and peer check,
and hostile XML (billion laughs, quadratic blow-up, external entities) from a mall.

The canary values are the credentials the simulators issue (service secrets, license
keys, refresh/access tokens, API keys) plus derived forms an adapter puts on the wire
(Rakuten's base64 ``ESA`` header). None may appear in the daemon's JSON log lines,
``/metrics``, any control reply, the ledger's errors table, or anywhere in the ledger file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import RemoteError, call
from goqd.errors import LEVEL_CREDENTIAL
from goqd.ledger import queries
from goqd.sim.base import SimMall
from goqd.sim.http import Request, Response
from tests.helpers import rig

STORES = (("ra", "rakuten"), ("ya", "yahoo"), ("au", "aupay"), ("sh", "shopify"), ("am", "amazon"))
SECRET_FIELDS = {
    "rakuten": ("service_secret", "license_key"),
    "yahoo": ("client_secret", "refresh_token"),
    "aupay": ("api_key",),
    "shopify": ("access_token", "webhook_secret"),
    "amazon": ("client_secret", "refresh_token"),
}


def _canaries(fleet: rig.Fleet, issued: Iterable[tuple[str, dict[str, str]]]) -> set[str]:
    """Every secret any simulator ever issued or accepted, and the wire forms of them."""
    values: set[str] = set()
    for store, creds in issued:
        mall = fleet.malls[store]
        for field in SECRET_FIELDS[mall]:
            if creds.get(field):
                values.add(creds[field])
        if mall == "rakuten":
            esa = f"{creds['service_secret']}:{creds['license_key']}".encode()
            values.add(base64.b64encode(esa).decode())
    for sim in fleet.sims.values():
        for attr in ("_access_tokens", "_refresh_tokens", "_tokens", "_keys", "_access"):
            values.update(str(k) for k in getattr(sim, attr, {}) or {})
    return {v for v in values if len(v) >= 8}


def _leaks(canaries: set[str], where: str, text: str) -> list[str]:
    return [f"{where}: {c[:4]}…" for c in canaries if c in text]


@pytest.fixture
async def prig() -> AsyncIterator[rig.ProcessRig]:
    tmp = tempfile.mkdtemp(prefix="gqs-", dir="/tmp")
    # Amazon without its two-minute order lag, so that real time stays short.
    async with rig.open_process_rig(
        STORES,
        tmp,
        log_level="debug",
        sim_options={"amazon": {"data_lag_s": 0.0, "min_before_s": 0.0}},
        store_options={"amazon": {"lag_s": 1}},
    ) as r:
        yield r
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
async def test_credential_canary_never_appears_in_any_output(prig: rig.ProcessRig) -> None:
    r = prig
    issued: list[tuple[str, dict[str, str]]] = [
        (s, sim.credentials()) for s, sim in r.fleet.sims.items()
    ]
    await r.daemon.start()
    await r.daemon.wait_ready()
    await r.settle()
    market = r.fleet.market(random.Random(41))
    for _ in range(8):
        market.place_random(time.time())
    await r.settle()
    replies: list[Any] = []

    # Malformed answers (the adapters' error messages quote the mall, not our request).
    for sim in r.fleet.sims.values():
        sim.faults.malformed = "html"
    await r.daemon.poll_now(r.stores)
    await trio.sleep(2.5)
    for sim in r.fleet.sims.values():
        sim.faults.malformed = ""

    # Every key expires: level 9 everywhere; a wrong key is refused, the right one taken.
    for sim in r.fleet.sims.values():
        sim.expire_credentials()
    market.place_random(time.time())
    await r.daemon.poll_now(r.stores)
    await rig.wait_for(
        lambda: _all_stopped(r), timeout=30, every=0.2, what="every store stopped at level 9"
    )
    for store, sim in r.fleet.sims.items():
        stale = dict(issued[[s for s, _ in issued].index(store)][1])
        try:
            await r.daemon.request(p.KeySet(store=store, credentials=stale), timeout=20)
        except RemoteError as exc:
            replies.append(f"{exc.code} {exc.message} {exc.hint}")
        fresh = sim.issue_credentials()
        issued.append((store, fresh))
        replies.append(await r.daemon.request(p.KeySet(store=store, credentials=fresh), timeout=20))
    await r.settle()

    # Collect every output channel.
    for req in (p.Status(), p.Stores(), m.ListErrors(include_cleared=True), m.ListProducts()):
        replies.append(await r.daemon.request(req))
    for store in r.stores:
        replies.append(await r.daemon.request(m.ListListings(store=store)))
        replies.append(await r.daemon.request(p.Diff(store=store), timeout=30))
    for sku in r.fleet.initial:
        replies.append(await r.daemon.request(m.GetHistory(sku=sku)))
    log = r.daemon.log_text()
    url = re.search(r'"url": "(http://127\.0\.0\.1:\d+)"', log)
    assert url is not None
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(url.group(1) + "/metrics")).text
    assert await r.daemon.stop() == 0
    errors = [
        (e.store, e.level, e.code, e.message) for e in queries.read(r.ledger_path, queries.errors)
    ]
    assert any(level == 9 for _s, level, _c, _m in errors)
    assert any(level == 8 for _s, level, _c, _m in errors)
    assert {s for s, level, _c, _m in errors if level == 9} == set(r.stores)
    ledger_bytes = b"".join(
        Path(r.ledger_path + suffix).read_bytes()
        for suffix in ("", "-wal")
        if os.path.exists(r.ledger_path + suffix)
    ).decode("latin-1")

    canaries = _canaries(r.fleet, issued)
    assert len(canaries) >= 12
    reply_text = json.dumps([_builtins(x) for x in replies], ensure_ascii=False)
    leaks = (
        _leaks(canaries, "log", log)
        + _leaks(canaries, "metrics", metrics)
        + _leaks(canaries, "control replies", reply_text)
        + _leaks(canaries, "errors table", json.dumps(errors, ensure_ascii=False))
        + _leaks(canaries, "ledger file", ledger_bytes)
    )
    assert not leaks, leaks
    # The channels were not empty: the check looked at something.
    assert len(log.splitlines()) > 20 and "goqd_store_up" in metrics and len(errors) >= 6
    # Renewed keys live only in the 0600 files goqctl key set wrote.
    creds_dir = Path(r.config.daemon.credentials_dir)
    for f in creds_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    print(
        f"\ncanary: {len(canaries)} secrets over {len(log.splitlines())} log lines, "
        f"{len(metrics.splitlines())} metric lines, {len(replies)} control replies, "
        f"{len(errors)} error rows, {len(ledger_bytes)} ledger bytes: no leak"
    )


def _all_stopped(r: rig.ProcessRig) -> bool:
    open_errors = queries.read(r.ledger_path, queries.errors, open_only=True)
    return {e.store for e in open_errors if e.level == LEVEL_CREDENTIAL} == set(r.stores)


def _builtins(x: Any) -> Any:
    import msgspec

    try:
        return msgspec.to_builtins(x)
    except TypeError:
        return str(x)


# ------------------------------------------------------------------ control socket

_PEER_PROBE = r"""
import json, socket, struct, sys
body = json.dumps({"v": 1, "id": "probe", "request": {"type": "status"}}).encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except (BrokenPipeError, ConnectionResetError):
    pass  # refused before reading: the reply is already queued for us
data = b""
while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
reply = json.loads(data[4:])["reply"]
print(reply.get("code", reply["type"]))
"""


def _as_nobody(sock: str, gid: int = 65534) -> str:
    """The probe's answer for user nobody with primary group ``gid``: a reply's code,
    ``ok``, or ``EACCES`` when the socket file's mode refuses the connection."""
    out = subprocess.run(
        ["/usr/bin/python3", "-c", _PEER_PROBE, sock],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        preexec_fn=lambda: _drop_to_nobody(gid),
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _drop_to_nobody(gid: int = 65534) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(65534)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="needs root to act as another user",
)
async def test_control_socket_is_0660_and_refuses_peers_outside_the_allowed_set() -> None:
    from structlog.testing import capture_logs

    tmp = tempfile.mkdtemp(prefix="gqp-", dir="/tmp")
    os.chmod(tmp, 0o755)  # so that only the socket's own mode stands in the way
    fleet = rig.build_fleet((("ra", "rakuten"),), clock=time.time)
    router, urls = rig.router_for(fleet)
    with trio.fail_after(30), capture_logs() as logs:
        async with rig.open_daemon(fleet, tmp, urls, transport=router, clock=time.time) as run:
            st = os.stat(run.socket)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
            # Layer 1, the file mode: another user cannot even connect.
            assert await trio.to_thread.run_sync(_as_nobody, run.socket) == "EACCES"
            # Layer 2, SO_PEERCRED: with the mode opened up by mistake, still refused.
            os.chmod(run.socket, 0o666)
            assert await trio.to_thread.run_sync(_as_nobody, run.socket) == "not_allowed"
            # The daemon is unaffected and serves its own user.
            assert isinstance(await call(run.socket, p.Status()), p.DaemonStatus)
    shutil.rmtree(tmp, ignore_errors=True)
    refused = [e for e in logs if e.get("event") == "control_peer_refused"]
    assert refused and refused[0]["peer_uid"] == 65534


def _existing_group(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


async def _done(req: p.ControlRequest, peer: Any) -> p.Ok | p.Err:
    return p.Ok(result=m.Done())


@pytest.mark.skipif(
    os.geteuid() != 0
    or not os.path.exists("/usr/bin/python3")
    or _existing_group("daemon") is None,
    reason="needs root to act as another user, and a group named daemon",
)
async def test_the_socket_belongs_to_the_control_group_so_its_members_can_connect() -> None:
    from tests.helpers.control import serving

    group = _existing_group("daemon")
    assert group is not None and group != os.getgid()
    tmp = tempfile.mkdtemp(prefix="gqg-", dir="/tmp")
    os.chmod(tmp, 0o755)
    sock = os.path.join(tmp, "c.sock")
    try:
        with trio.fail_after(30):
            async with serving(sock, _done, allowed_gids=frozenset({group})):
                st = os.stat(sock)
                assert st.st_gid == group and stat.S_IMODE(st.st_mode) == 0o660
                # A member of the configured group passes both the file mode and the
                # SO_PEERCRED check; a user outside it is stopped by the mode.
                assert await trio.to_thread.run_sync(_as_nobody, sock, group) == "ok"
                assert await trio.to_thread.run_sync(_as_nobody, sock) == "EACCES"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _effectively_nobody() -> Iterator[None]:
    """Run the block as user nobody (effective ids, so root can come back after)."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@pytest.mark.skipif(
    os.geteuid() != 0 or _existing_group("daemon") is None,
    reason="needs root to act as another user, and a group named daemon",
)
def test_a_control_group_the_daemon_is_not_in_refuses_the_start_naming_it() -> None:
    import functools

    from goqd.control.server import serve_control
    from goqd.errors import ControlError

    tmp = tempfile.mkdtemp(prefix="gqg-", dir="/tmp")
    os.chmod(tmp, 0o777)  # nobody creates the socket here
    sock = os.path.join(tmp, "c.sock")
    group = _existing_group("daemon")
    assert group is not None
    try:
        serve = functools.partial(
            serve_control,
            sock,
            _done,
            allowed_uids=frozenset(),
            allowed_gids=frozenset({group}),
        )

        async def start_bounded() -> None:
            # A server that did start would serve for ever, as nobody: bound it.
            with trio.fail_after(10):
                await serve()

        with _effectively_nobody(), pytest.raises(ControlError) as info:
            trio.run(start_bounded)
        message = str(info.value)
        assert "group 'daemon'" in message and "not a member" in message
        assert "usermod -aG daemon nobody" in message
        assert not os.path.exists(sock)  # nothing half set up is left behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or _existing_group("daemon") is None,
    reason="needs root to act as another user, and a group named daemon",
)
def test_goqctl_refused_by_the_socket_mode_names_the_sockets_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    from goqd.cli.goqctl import main

    tmp = tempfile.mkdtemp(prefix="gqg-", dir="/tmp")
    os.chmod(tmp, 0o755)
    sock_path = os.path.join(tmp, "c.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(sock_path)
        listening.listen(1)
        os.chmod(sock_path, 0o660)
        os.chown(sock_path, -1, _existing_group("daemon") or 0)
        with _effectively_nobody():
            code = main(["--socket", sock_path, "status"])
    finally:
        listening.close()
        shutil.rmtree(tmp, ignore_errors=True)
    err = capsys.readouterr().err
    assert code == 3 and "permission denied" in err
    assert "'daemon' group" in err and "-aG goqd" not in err


# ------------------------------------------------------------------ hostile XML

BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
        for i in range(1, 10)
    )
    + "]>\n<ResultSet><Result>&lol9;</Result></ResultSet>"
)
QUADRATIC = (
    '<?xml version="1.0"?>\n<!DOCTYPE q [<!ENTITY a "' + "x" * 50_000 + '">]>\n'
    "<ResultSet>" + "&a;" * 2_000 + "</ResultSet>"
)
EXTERNAL = (
    '<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/hostname">]>\n'
    "<ResultSet><Result>&xxe;</Result></ResultSet>"
)


def _poison(sim: SimMall, body: str) -> None:
    """Every Store API answer of this simulator becomes ``body`` (tokens still work)."""
    real = sim.handle

    async def handle(request: Request, api: str) -> Response:
        response = await real(request, api)
        if "token" in request.path:
            return response
        return Response.xml(body)

    sim.handle = handle  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, QUADRATIC, EXTERNAL],
    ids=["billion-laughs", "quadratic", "external-entity"],
)
@pytest.mark.parametrize("mall", ["yahoo", "aupay"])
def test_hostile_xml_from_a_mall_is_refused_as_a_level_8_protocol_error(
    mall: str, body: str
) -> None:
    async def main(run: rig.Running) -> None:
        sim = run.fleet.sims["x"]
        handle = run.daemon.handles["x"]
        _poison(sim, body)
        run.fleet.market(random.Random(1)).place("x", "TS-RED-S", 1, rig.mock_wall_clock())
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "degraded", timeout=120, what="degraded")
        assert handle.error_level == 8
        errors = [
            (e.level, e.code, e.message) for e in queries.read(run.ledger_path, queries.errors, "x")
        ]
        assert errors and all(level == 8 for level, _c, _m in errors)
        assert "lollol" not in json.dumps(errors)  # nothing was expanded
        etc = Path("/etc/hostname")
        hostname = etc.read_text().strip() if etc.exists() else ""
        if hostname:
            assert hostname not in json.dumps(errors)
        assert queries.read(run.ledger_path, queries.order_lines) == []
        from tests.helpers.checker import metric_samples

        metrics = metric_samples(run.metrics_text())
        assert metrics[("goqd_polls_total", (("outcome", "protocol"), ("store", "x")))] >= 1

    started = time.perf_counter()
    rig.run_dst(main, seed=42, stores=(("x", mall), ("ra", "rakuten")))
    assert time.perf_counter() - started < 20  # no entity expansion ate the CPU


def test_the_shared_tls_context_verifies_certificates_and_host_names() -> None:
    # Every mall client shares one context (goqd.malls.base.tls_context); sharing it
    # must not cost verification.
    import ssl

    from goqd.malls.base import tls_context

    ctx = tls_context()
    assert ctx is tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 0  # a CA bundle is loaded
