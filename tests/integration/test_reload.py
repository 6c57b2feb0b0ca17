"""`systemctl reload goqd` (SIGHUP): the config file and credentials are read and checked
again; the keys that may change live take effect, every other changed key is reported
as needing a restart, and a file that fails the start-up checks changes nothing.

The diff itself (``goqd.reload``) is tested as pure functions; the daemon on the
deterministic in-process rig (``tests.helpers.rig.run_dst``: simulated malls and
clock, real SQLite ledger, real control socket); the signal, the systemd notify
messages and the log level on a real ``goqd run`` process sent SIGHUP, with a real
datagram socket as ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import structlog
import trio

from goqd import messages as m
from goqd import reload
from goqd.cli import goqctl
from goqd.config import Config, DaemonConfig, StoreConfig, credential_path
from goqd.control import protocol as p
from goqd.control.client import call
from goqd.reload import plan_reload
from goqd.secret import Secret
from goqd.sim.rakuten import SimRakuten
from tests.helpers import rig
from tests.helpers.daemon import notify_listener, received
from tests.helpers.paths import ROOT

UNITS = ROOT / "systemd"


# ---------------------------------------------------------------------- helpers


def _store(name: str, mall: str = "rakuten", **kw: Any) -> StoreConfig:
    kw.setdefault("base_url", "https://x.invalid")
    kw.setdefault("credentials", f"{name}.json")
    return StoreConfig(name=name, mall=mall, **kw)


def _config(*stores: StoreConfig, **daemon: Any) -> Config:
    return Config(daemon=DaemonConfig(**daemon), stores=stores, source="/etc/goqd/goqd.toml")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value).__name__)


def write_config(config: Config, path: str | None = None) -> str:
    """Every key of ``config`` as the TOML file an operator would write."""
    data = msgspec.to_builtins(config)
    lines = ["[daemon]"]
    lines += [f"{k} = {_toml(v)}" for k, v in data["daemon"].items()]
    for store in data["stores"]:
        lines += ["", "[[stores]]"]
        lines += [f"{k} = {_toml(v)}" for k, v in store.items() if v is not None]
    target = path or config.source
    Path(target).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def edit_store(config: Config, name: str, **changes: Any) -> Config:
    stores = tuple(
        msgspec.structs.replace(s, **changes) if s.name == name else s for s in config.stores
    )
    return msgspec.structs.replace(config, stores=stores)


def edit_daemon(config: Config, **changes: Any) -> Config:
    return msgspec.structs.replace(config, daemon=msgspec.structs.replace(config.daemon, **changes))


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` text (0 for none)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------------- the diff (pure)


def test_an_unchanged_file_changes_nothing_and_store_order_is_no_setting() -> None:
    running = _config(_store("ra"), _store("rb"))
    loaded = _config(_store("rb"), _store("ra"))
    plan = plan_reload(running, loaded)
    assert not plan.changed and plan.stores == ()
    assert plan.config == running


def test_live_keys_are_applied_and_every_other_change_waits_for_a_restart() -> None:
    running = _config(_store("ra"), _store("rb"), http_listen="127.0.0.1:9464")
    loaded = _config(
        _store(
            "ra",
            poll_interval="30s",
            live_statuses=("100", "300"),
            link_normalize=("nfkc",),
            watch_interval="0s",
            watch_below=3,
            hold_expiry="10m",
            credentials="ra-new.json",
            base_url="https://y.invalid",
            options={"link_field": "variantId"},
        ),
        _store("rb"),
        http_listen="127.0.0.1:9500",
        ledger="/srv/goqd.db",
        log_level="debug",
    )
    plan = plan_reload(running, loaded)
    assert set(plan.live) == {
        "daemon.log-level",
        "stores[ra].poll-interval",
        "stores[ra].live-statuses",
        "stores[ra].link-normalize",
        "stores[ra].watch-interval",
        "stores[ra].watch-below",
        "stores[ra].hold-expiry",
        "stores[ra].credentials",
    }
    assert set(plan.restart) == {
        "daemon.http-listen",
        "daemon.ledger",
        "stores[ra].base-url",
        "stores[ra].options",
    }
    assert plan.stores == ("ra",)
    # The config the daemon runs with from now: the live values, the old ones elsewhere.
    ra = plan.config.store("ra")
    assert (ra.poll_interval, ra.live_statuses, ra.watch_below) == ("30s", ("100", "300"), 3)
    assert (ra.base_url, ra.options) == ("https://x.invalid", {})
    assert plan.config.daemon.log_level == "debug"
    assert (plan.config.daemon.http_listen, plan.config.daemon.ledger) == ("127.0.0.1:9464", "")
    assert plan.config.store("rb") == running.store("rb")
    assert "daemon.http-listen changed" in reload.restart_message(plan, "daemon.http-listen")


def test_stores_added_or_removed_are_reported_and_not_half_applied() -> None:
    running = _config(_store("ra"), _store("gone"))
    loaded = _config(_store("ra", poll_interval="1m"), _store("new"))
    plan = plan_reload(running, loaded)
    assert set(plan.restart) == {"stores[gone]", "stores[new]"}
    assert set(reload.restart_keys(plan)) == {
        "stores[gone] (store removed)",
        "stores[new] (store added)",
    }
    # The running stores stay as they are (the removed one too); the others' live keys apply.
    assert [s.name for s in plan.config.stores] == ["ra", "gone"]
    assert plan.config.store("gone") == running.store("gone")
    assert plan.live == ("stores[ra].poll-interval",)
    assert "store added" in reload.restart_message(plan, "stores[new]")


def test_a_store_whose_mall_changed_waits_for_the_restart_whole() -> None:
    # 30s suits Rakuten but is too fast for Yahoo: the new values were checked against
    # the new mall, so none of them may reach the running one.
    running = _config(_store("ra", mall="yahoo", poll_interval="5m"))
    loaded = _config(_store("ra", mall="rakuten", poll_interval="30s"))
    plan = plan_reload(running, loaded)
    assert plan.live == () and plan.stores == ()
    assert set(plan.restart) == {"stores[ra].mall", "stores[ra].poll-interval"}
    assert plan.config == running


def test_every_live_key_is_a_config_key() -> None:
    # A misspelt name here would silently make a key restart-only.
    store_fields = {f.name for f in msgspec.structs.fields(StoreConfig)}
    daemon_fields = {f.name for f in msgspec.structs.fields(DaemonConfig)}
    assert store_fields >= reload.LIVE_STORE_KEYS
    assert daemon_fields >= reload.LIVE_DAEMON_KEYS
    # Identity and wiring never change live.
    assert not {"name", "mall", "base_url", "urls", "options"} & reload.LIVE_STORE_KEYS
    assert {"log_level"} == reload.LIVE_DAEMON_KEYS


# ---------------------------------------------------------------------- the daemon


def _polls(run: rig.Running, store: str) -> int:
    return run.daemon.handles[store].polls


async def _polls_during(run: rig.Running, seconds: float) -> dict[str, int]:
    before = {name: h.polls for name, h in run.daemon.handles.items()}
    await trio.sleep(seconds)
    return {name: h.polls - before[name] for name, h in run.daemon.handles.items()}


def test_a_changed_poll_interval_takes_effect_at_reload() -> None:
    async def body(run: rig.Running) -> None:
        path = write_config(run.config)
        # The file as the daemon started with it: nothing to do.
        plan = await run.daemon.reload()
        assert plan is not None and not plan.changed
        slow = await _polls_during(run, 1200)
        assert slow["ra"] <= 5 and slow["rb"] <= 5, slow  # every 300 s

        write_config(edit_store(run.config, "ra", poll_interval="20s"), path)
        plan = await run.daemon.reload()
        assert plan is not None
        assert plan.live == ("stores[ra].poll-interval",) and plan.restart == ()
        assert run.daemon.config.store("ra").poll_interval == "20s"
        fast = await _polls_during(run, 1200)
        assert fast["ra"] >= 50, fast  # every 20 s from now on
        assert fast["rb"] <= 5, fast  # untouched
        assert {h.state for h in run.daemon.handles.values()} == {"running"}
        text = run.metrics_text()
        assert sample(text, "goqd_config_reloads_total", outcome="ok") == 2
        assert sample(text, "goqd_config_reloads_total", outcome="refused") == 0
        assert sample(text, "goqd_config_last_reload_successful") == 1

    rig.run_dst(body, seed=171, poll_interval="300s")


def test_an_invalid_config_is_refused_and_the_daemon_runs_on_unchanged() -> None:
    async def body(run: rig.Running) -> None:
        good = run.config
        path = write_config(good)
        running = run.daemon.config
        cred = good.store("ra").credentials
        secret = json.loads(Path(cred).read_text())["license_key"]
        bad_files: list[tuple[str, str]] = []

        def broken_toml() -> None:
            write_config(edit_store(good, "ra", poll_interval="20s"), path)
            with open(path, "a", encoding="utf-8") as f:
                f.write("[[stores]\n")  # a typo: the whole file is refused

        def too_fast() -> None:
            # Faster than Rakuten allows: refused by the same check as at start, and
            # rb's live change in the same file is not applied either.
            write_config(
                edit_store(edit_store(good, "ra", poll_interval="5s"), "rb", poll_interval="20s"),
                path,
            )

        def unknown_key() -> None:
            write_config(good, path)
            with open(path, "a", encoding="utf-8") as f:
                f.write('pol-interval = "20s"\n')

        def credential_readable_by_others() -> None:
            write_config(edit_store(good, "ra", poll_interval="20s"), path)
            os.chmod(cred, 0o644)

        missing = os.path.join(os.path.dirname(cred), "ra-renamed.json")

        def credential_renamed_to_a_file_that_is_not_there() -> None:
            # A live key, but the store must not be handed no credential (or keep the old
            # one while the file says otherwise): the reload is refused, naming the file.
            os.chmod(cred, 0o600)
            write_config(edit_store(good, "ra", credentials=missing), path)

        cases = [
            (broken_toml, "goqd.toml"),
            (too_fast, "$.stores[0].poll-interval"),
            (unknown_key, "pol-interval"),
            (credential_readable_by_others, "chmod 600"),
            (credential_renamed_to_a_file_that_is_not_there, missing),
        ]
        with structlog.testing.capture_logs() as logs:
            for n, (make, named) in enumerate(cases, start=1):
                make()
                assert await run.daemon.reload() is None
                assert run.daemon.config is running  # nothing applied
                status = await call(run.socket, p.Status())
                assert isinstance(status, p.DaemonStatus)
                assert named in status.reload_error, (named, status.reload_error)
                bad_files.append((named, status.reload_error))
                text = run.metrics_text()
                assert sample(text, "goqd_config_reloads_total", outcome="refused") == n
                assert sample(text, "goqd_config_last_reload_successful") == 0
        os.chmod(cred, 0o600)
        refused = [e for e in logs if e["event"] == "config_reload_refused"]
        assert len(refused) == len(cases)
        assert all(e["log_level"] == "error" for e in refused)
        assert not any(secret in json.dumps(e, default=str) for e in logs)
        assert not any(secret in reason for _, reason in bad_files)
        # Still polling every 300 s, every store running.
        polls = await _polls_during(run, 1200)
        assert polls["ra"] <= 5 and polls["rb"] <= 5, polls
        assert {h.state for h in run.daemon.handles.values()} == {"running"}
        # A good file again: applied, and the refusal is gone from the status.
        write_config(edit_store(good, "ra", poll_interval="20s"), path)
        assert await run.daemon.reload() is not None
        status = await call(run.socket, p.Status())
        assert isinstance(status, p.DaemonStatus) and status.reload_error == ""
        assert sample(run.metrics_text(), "goqd_config_last_reload_successful") == 1
        assert (await _polls_during(run, 600))["ra"] >= 25

    rig.run_dst(body, seed=172, poll_interval="300s")


def test_a_restart_only_change_is_reported_and_not_applied() -> None:
    async def body(run: rig.Running) -> None:
        good = run.config
        http_url = run.daemon.http_url
        changed = edit_daemon(good, http_listen="127.0.0.1:9", ledger=good.daemon.ledger_path + "2")
        changed = edit_store(
            changed,
            "ra",
            options={**good.store("ra").options, "page_size": 500},
            poll_interval="20s",
        )
        # A store added: its credential file must pass like any other.
        extra = msgspec.structs.replace(good.store("rb"), name="rc")
        changed = msgspec.structs.replace(changed, stores=(*changed.stores, extra))
        path = write_config(changed)
        with structlog.testing.capture_logs() as logs:
            plan = await run.daemon.reload()
        assert plan is not None
        assert set(plan.restart) == {
            "daemon.http-listen",
            "daemon.ledger",
            "stores[ra].options",
            "stores[rc]",
        }
        # One line per key, each naming it.
        lines = [e for e in logs if e["event"] == "config_key_needs_restart"]
        assert sorted(e["key"] for e in lines) == sorted(plan.restart)
        assert all("restarted" in e["message"] for e in lines)
        # Not applied: the same listener and ledger, no store rc, ra's old options; its
        # poll interval (live) is.
        d = run.daemon.config.daemon
        assert (d.http_listen, d.ledger) == (good.daemon.http_listen, good.daemon.ledger)
        assert run.daemon.http_url == http_url
        assert sorted(run.daemon.handles) == ["ra", "rb"]
        assert run.daemon.config.store("ra").options == good.store("ra").options
        assert run.daemon.config.store("ra").poll_interval == "20s"
        assert "rc" not in run.metrics_text()
        status = await call(run.socket, p.Status())
        assert isinstance(status, p.DaemonStatus)
        assert set(status.restart_needed) == {
            "daemon.http-listen",
            "daemon.ledger",
            "stores[ra].options",
            "stores[rc] (store added)",
        }
        assert sample(run.metrics_text(), "goqd_config_restart_needed_keys") == 4
        # Put back as it was: nothing waits any more.
        write_config(good, path)
        plan = await run.daemon.reload()
        assert plan is not None and plan.restart == ()
        status = await call(run.socket, p.Status())
        assert isinstance(status, p.DaemonStatus) and status.restart_needed == ()
        assert sample(run.metrics_text(), "goqd_config_restart_needed_keys") == 0

    rig.run_dst(body, seed=173)


def test_a_hand_edited_credential_takes_effect_at_reload() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        handle = run.daemon.handles["ra"]
        write_config(run.config)
        old_key = ra.credentials()["license_key"]
        new = ra.issue_credentials()  # the old key stays valid until we expire it
        rig.write_credentials(run.config.store("ra").credentials, new)
        with structlog.testing.capture_logs() as logs:
            plan = await run.daemon.reload()
        assert plan is not None and not plan.changed
        assert handle.credentials["license_key"].reveal() == new["license_key"]
        assert [e["store"] for e in logs if e["event"] == "credential_reloaded"] == ["ra"]
        assert not any(new["license_key"] in json.dumps(e, default=str) for e in logs)
        ra.set_key_expiry(old_key, rig.mock_wall_clock())
        polls = handle.polls
        run.poll_all()
        await rig.wait_for(lambda: handle.polls > polls, timeout=120, what="a poll")
        await trio.sleep(600)
        assert handle.state == "running", handle.message

    rig.run_dst(body, seed=174)


def test_a_store_stopped_at_level_9_stays_stopped_until_its_error_is_cleared() -> None:
    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        handle = run.daemon.handles["ra"]
        write_config(edit_store(run.config, "ra", poll_interval="20s"))
        new = ra.issue_credentials()
        ra.expire_credentials()
        ra.set_key_expiry(new["license_key"], rig.mock_wall_clock() + 86400 * 30)
        run.poll_all()
        await rig.wait_for(lambda: handle.state == "stopped", timeout=120, what="stopped")
        # The operator writes the new key into the file by hand and reloads.
        rig.write_credentials(run.config.store("ra").credentials, new)
        plan = await run.daemon.reload()
        assert plan is not None and plan.live == ("stores[ra].poll-interval",)
        assert handle.credentials["license_key"].reveal() == new["license_key"]
        await trio.sleep(600)
        assert handle.state == "stopped" and handle.error_level == 9
        # Clearing the error resumes it, and the reloaded key is the one that works.
        await call(run.socket, m.ClearErrors(store="ra"))
        polls = handle.polls
        await rig.wait_for(lambda: handle.polls > polls + 5, timeout=600, what="polls")
        assert run.daemon.handles["ra"].state == "running"

    rig.run_dst(body, seed=175)


def test_a_reload_never_hands_a_store_back_a_credential_goqd_has_renewed_since() -> None:
    """The mall renewed the store's key twice; goqd wrote the first where a restart reads
    it, the second is not on disk (its write is under way, or failed on a full disk). A
    reload for another key must leave the store the second: the file's is one the mall
    may already refuse (Yahoo's rotated refresh token). A file an operator edits is
    still taken."""

    async def body(run: rig.Running) -> None:
        ra = run.fleet.sims["ra"]
        assert isinstance(ra, SimRakuten)
        handle = run.daemon.handles["ra"]
        keeper = handle.credential_keeper
        assert keeper is not None
        first, second = ra.issue_credentials(), ra.issue_credentials()
        handle.credentials["license_key"] = Secret(first["license_key"])
        await keeper.save(handle.credentials)
        assert keeper.saves == 1
        held = handle.credentials
        held["license_key"] = Secret(second["license_key"])
        write_config(edit_store(run.config, "ra", poll_interval="20s"))
        with structlog.testing.capture_logs() as logs:
            plan = await run.daemon.reload()
        assert plan is not None and plan.live == ("stores[ra].poll-interval",)
        assert handle.credentials is held
        assert handle.credentials["license_key"].reveal() == second["license_key"]
        assert not [e for e in logs if e["event"] == "credential_reloaded"]
        # The operator writes a key into the file goqd reads: that one is taken.
        third = ra.issue_credentials()
        path = credential_path(run.daemon.config, run.daemon.config.store("ra"))
        rig.write_credentials(path, third)
        assert await run.daemon.reload() is not None
        assert handle.credentials["license_key"].reveal() == third["license_key"]

    rig.run_dst(body, seed=176)


# ---------------------------------------------------------------------- goqctl, units


def test_goqctl_status_shows_a_refused_reload_and_keys_waiting_for_a_restart() -> None:
    status = p.DaemonStatus(
        version="0",
        started_at=0.0,
        uptime_s=1.0,
        stores=(),
        ledger=m.LedgerStatus(
            products=0,
            listings=0,
            order_lines=0,
            movements=0,
            outbox=0,
            parked=0,
            oversold_units=0,
            duplicates=0,
            stores=(),
        ),
        restart_needed=("daemon.http-listen", "stores[new] (store added)"),
        reload_error="/etc/goqd/goqd.toml: $.stores[0].poll-interval: must be more than 0",
    )
    text = goqctl._render_status(status, now=1.0)
    assert "daemon.http-listen, stores[new] (store added)" in text
    assert "restarted" in text
    assert "reload refused" in text and "$.stores[0].poll-interval" in text


GUIDES = {
    ROOT / "docs" / "operator-guide.md": "## Reloading the configuration",
    ROOT / "docs" / "operator-guide.ja.md": "## 設定の再読み込み",
}


@pytest.mark.parametrize("guide", sorted(GUIDES), ids=lambda g: g.name)
def test_the_guides_name_every_key_live_or_restart_as_goqd_does(guide: Path) -> None:
    text = guide.read_text(encoding="utf-8")
    section = text.split(GUIDES[guide] + "\n", 1)[1].split("\n## ", 1)[0]
    table, rest = section.split("\n\n| ", 1)[1].split("\n\n", 1)

    def kebab(cls: type[msgspec.Struct]) -> dict[str, str]:
        return {f.name: f.encode_name for f in msgspec.structs.fields(cls)}

    for name, key in kebab(StoreConfig).items():
        if name == "name":
            continue
        live = name in reload.LIVE_STORE_KEYS
        assert (f"`{key}`" in table) == live, (key, live)
        assert live or f"`{key}`" in rest, key
    for name, key in kebab(DaemonConfig).items():
        live = name in reload.LIVE_DAEMON_KEYS
        shown = f"`daemon.{key}`" if live else f"`{key}`"
        assert shown in (table if live else rest), key


def test_both_units_reload_by_sighup() -> None:
    for name in ("goqd.service", "goqd@.service"):
        text = (UNITS / name).read_text()
        assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.MULTILINE), name


# ---------------------------------------------------------------------- a real process


@contextlib.contextmanager
def _tmpdir() -> Iterator[str]:
    # Short: the control socket's path must fit in sun_path.
    tmp = tempfile.mkdtemp(prefix="goqd-rl-", dir="/tmp")
    try:
        yield tmp
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


async def _datagrams(sock: Any, want: int, timeout: float = 20.0) -> list[str]:  # noqa: ASYNC109
    got: list[str] = []
    with trio.fail_after(timeout):
        while len(got) < want:
            got += received(sock)
            await trio.sleep(0.02)
    return got


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_sighup_reloads_a_running_process_and_tells_systemd() -> None:
    with _tmpdir() as tmp, notify_listener() as (sock, notify_path):
        async with rig.open_process_rig([("ra", "rakuten")], tmp, log_level="info") as r:
            log_path = os.path.join(tmp, "goqd.log")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": notify_path}
            env.pop("WATCHDOG_USEC", None)
            with open(log_path, "ab") as log:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "goqd.cli.goqd", "run", "--config", r.config_path],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(ROOT),
                )
            try:
                first = await _datagrams(sock, 1, timeout=30)
                assert first[0].startswith("READY=1")
                ready = [
                    json.loads(x)
                    for x in Path(log_path).read_text().splitlines()
                    if '"daemon_ready"' in x
                ]
                metrics_url = ready[0]["http"] + "/metrics"
                sku = "TEA-SEN"

                async def adjust_and_wait(delta: int) -> None:
                    want = (r.fleet.stock("ra", sku) or 0) + delta
                    await call(r.config.daemon.control_socket, m.AdjustStock(sku=sku, delta=delta))
                    await rig.wait_for(
                        lambda: r.fleet.stock("ra", sku) == want, timeout=20, what="the push"
                    )

                # At info, a push logs no stock_pushed (a debug line).
                await adjust_and_wait(-1)
                assert '"stock_pushed"' not in Path(log_path).read_text()

                changed = edit_daemon(r.config, log_level="debug", http_listen="localhost:0")
                changed = edit_store(changed, "ra", poll_interval="20s")
                write_config(changed, r.config_path)
                before = _monotonic_usec()
                proc.send_signal(signal.SIGHUP)
                said = await _datagrams(sock, 2)
                after = _monotonic_usec()
                assert said[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
                usec = int(re.search(r"MONOTONIC_USEC=(\d+)", said[0]).group(1))  # type: ignore[union-attr]
                assert before <= usec <= after
                assert said[1].startswith("READY=1") and "need a restart" in said[1]
                status = await call(r.config.daemon.control_socket, p.Status())
                assert isinstance(status, p.DaemonStatus)
                assert status.restart_needed == ("daemon.http-listen",)
                # The log level took effect: this push is logged at debug.
                await adjust_and_wait(+1)
                await rig.wait_for(
                    lambda: '"stock_pushed"' in Path(log_path).read_text(),
                    timeout=10,
                    what="a debug line",
                )
                text = Path(log_path).read_text()
                assert '"config_key_needs_restart"' in text and "daemon.http-listen" in text

                # A broken file: refused, counted, the process runs on.
                Path(r.config_path).write_text("[daemon\n", encoding="utf-8")
                proc.send_signal(signal.SIGHUP)
                said = await _datagrams(sock, 2)
                assert said[0].startswith("RELOADING=1")
                assert said[1].startswith("READY=1") and "reload refused" in said[1]
                async with httpx.AsyncClient() as client:
                    body = (await client.get(metrics_url)).text
                assert sample(body, "goqd_config_reloads_total", outcome="refused") == 1
                assert sample(body, "goqd_config_reloads_total", outcome="ok") == 1
                assert proc.returncode is None
                status = await call(r.config.daemon.control_socket, p.Status())
                assert isinstance(status, p.DaemonStatus) and status.reload_error
            finally:
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    code = await proc.wait()
            assert code == 0, Path(log_path).read_text()[-3000:]


# `goqd run`, with a SIGHUP sent while run_daemon checks the host: after the config was
# read and before any store exists. The file is edited first, as an operator would.
_HUP_WHILE_STARTING = """
import os, shutil, signal, sys
import goqd.app
from goqd.cli.goqd import main

check_host = goqd.app.check_host

def starting(config):
    goqd.app.check_host = check_host  # once: a reload checks the host too
    shutil.copyfile(sys.argv[1], config.source)
    os.kill(os.getpid(), signal.SIGHUP)
    check_host(config)

goqd.app.check_host = starting
sys.exit(main(["run", "--config", sys.argv[2]]))
"""


async def test_sighups_while_starting_in_a_storm_and_while_stopping_never_end_goqd() -> None:
    with _tmpdir() as tmp, notify_listener() as (sock, notify_path):
        async with rig.open_process_rig([("ra", "rakuten")], tmp) as r:
            log_path = os.path.join(tmp, "goqd.log")
            edited = os.path.join(tmp, "edited.toml")
            write_config(edit_daemon(r.config, http_listen="localhost:0"), edited)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": notify_path}
            env.pop("WATCHDOG_USEC", None)
            with open(log_path, "ab") as log:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _HUP_WHILE_STARTING, edited, r.config_path],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(ROOT),
                )
            socket_path = r.config.daemon.control_socket
            try:
                # Ready, then the reload the early SIGHUP asked for, with the edited file.
                said = await _datagrams(sock, 3, timeout=30)
                assert said[0].startswith("READY=1"), said
                assert said[1].startswith("RELOADING=1"), said
                assert said[2].startswith("READY=1") and "need a restart" in said[2], said
                status = await call(socket_path, p.Status())
                assert isinstance(status, p.DaemonStatus)
                assert status.restart_needed == ("daemon.http-listen",)

                # A storm: SIGHUPs that arrive during a reload make one more, not one each.
                for _ in range(50):
                    proc.send_signal(signal.SIGHUP)
                said = await _datagrams(sock, 2)
                assert said[0].startswith("RELOADING=1")
                await trio.sleep(1.0)
                said += received(sock)
                reloads = sum(x.startswith("RELOADING=1") for x in said)
                assert 1 <= reloads < 50, said
                assert proc.returncode is None
                status = await call(socket_path, p.Status())
                assert isinstance(status, p.DaemonStatus) and status.reload_error == ""

                # Stopped with SIGHUPs still arriving and pending: a clean stop.
                for _ in range(20):
                    proc.send_signal(signal.SIGHUP)
                proc.send_signal(signal.SIGTERM)
                for _ in range(20):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGHUP)
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    code = await proc.wait()
            assert code == 0, Path(log_path).read_text()[-3000:]


@pytest.fixture(autouse=True)
def _keep_log_level() -> Iterator[None]:
    import logging

    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)
