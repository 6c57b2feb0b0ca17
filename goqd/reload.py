"""What a reload (``systemctl reload goqd``, SIGHUP) may change in a running daemon.

``plan_reload(running, loaded)`` compares the config the daemon runs with the file as
it was just loaded and checked, key by key. A changed key is either *live* (the running
daemon takes the new value now) or needs a *restart*; the plan's ``config`` is the
running config with the live changes only, so it always describes what the daemon
actually does; it reads no file, clock or handle. ``reload_config`` (``Daemon.reload``,
at every SIGHUP) loads and checks the file and the credentials, plans, and applies the
plan to the running daemon.

Which keys are live, and why they are safe to change under a running daemon:

* per store, the values its mall session reads (poll, push retry and request timeout
  intervals, the order statuses polled, the sale watch's settings): the store's session
  is restarted with them, as after ``goqctl key set``; its cursor, rate buckets and the
  adapter's records carry over;
* per store, the link condition and the default lead time: read at each import and
  ``goqctl link --auto``;
* per store, the credential file's name: every reload reads the credential again;
* ``daemon.log-level``.

Everything else (listeners, paths, groups, a store's mall, URLs and options, stores
added or removed) needs a restart. A key added to the config later needs a restart
until it is listed here: this module must never call a key live that the running daemon
would not read again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
import trio

from goqd import systemd
from goqd.config import (
    Config,
    DaemonConfig,
    StoreConfig,
    check_host,
    credential_path,
    load_config,
    load_credentials,
)
from goqd.errors import ConfigError, GoqdError
from goqd.logs import set_log_level
from goqd.secret import Secret

if TYPE_CHECKING:
    from goqd.metrics import Metrics
    from goqd.stores.actor import StoreHandle

log = structlog.get_logger("goqd.reload")

# Attribute names (snake_case) of the keys applied without a restart.
LIVE_STORE_KEYS = frozenset(
    {
        "credentials",
        "poll_interval",
        "push_retry",
        "request_timeout",
        "live_statuses",
        "cancel_statuses",
        "link_normalize",
        "default_lead_time",
        "watch_interval",
        "watch_below",
        "hold_expiry",
        "clock_skew_limit",
    }
)
LIVE_DAEMON_KEYS = frozenset({"log_level"})
# Config's own fields that are no setting: where the file was read from.
_NOT_SETTINGS = frozenset({"source"})


@dataclass(frozen=True)
class ReloadPlan:
    """The difference between the running config and the file, and what to do about it.

    ``live`` and ``restart`` name changed keys as an operator finds them in the file:
    ``daemon.log-level``, ``stores[ra].poll-interval``; a store added or removed is
    ``stores[NAME]`` in ``restart``, with its reason in ``notes``.
    """

    config: Config
    live: tuple[str, ...]
    restart: tuple[str, ...]
    # Stores whose settings change now (their mall sessions restart with them).
    stores: tuple[str, ...]
    # Why a restart entry needs one, when the key alone does not say (added, removed).
    notes: dict[str, str]

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)


def store_key(store: str, key: str = "") -> str:
    """``stores[ra].poll-interval``: a store is named, not numbered (order is no setting)."""
    return f"stores[{store}]" + (f".{key}" if key else "")


def _encode_names(cls: type[msgspec.Struct]) -> dict[str, str]:
    return {f.name: f.encode_name for f in msgspec.structs.fields(cls)}


def _changed_fields(old: msgspec.Struct, new: msgspec.Struct) -> list[str]:
    """Attribute names whose values differ, in declaration order."""
    return [
        f.name
        for f in msgspec.structs.fields(type(old))
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    """Compare ``running`` with ``loaded`` (both checked configs); see the module docstring.

    A store whose mall changed is another store under the same name: all its changes
    wait for the restart, because the new values were checked against the new mall (a
    poll interval Rakuten allows is too fast for Yahoo).
    """
    live: list[str] = []
    restart: list[str] = []
    notes: dict[str, str] = {}
    stores: list[str] = []

    daemon_names = _encode_names(DaemonConfig)
    daemon_updates: dict[str, Any] = {}
    for name in _changed_fields(running.daemon, loaded.daemon):
        key = f"daemon.{daemon_names[name]}"
        if name in LIVE_DAEMON_KEYS:
            live.append(key)
            daemon_updates[name] = getattr(loaded.daemon, name)
        else:
            restart.append(key)
    for f in msgspec.structs.fields(Config):
        if f.name in ("daemon", "stores") or f.name in _NOT_SETTINGS:
            continue
        if getattr(running, f.name) != getattr(loaded, f.name):
            restart.append(f.encode_name)

    store_names = _encode_names(StoreConfig)
    new_by_name = {s.name: s for s in loaded.stores}
    old_names = {s.name for s in running.stores}
    applied: list[StoreConfig] = []
    for old in running.stores:
        new = new_by_name.get(old.name)
        if new is None:
            restart.append(store_key(old.name))
            notes[store_key(old.name)] = "store removed"
            applied.append(old)
            continue
        changed = _changed_fields(old, new)
        same_mall = old.mall == new.mall
        updates: dict[str, Any] = {}
        for name in changed:
            key = store_key(old.name, store_names[name])
            if same_mall and name in LIVE_STORE_KEYS:
                live.append(key)
                updates[name] = getattr(new, name)
            else:
                restart.append(key)
        if updates:
            stores.append(old.name)
            applied.append(msgspec.structs.replace(old, **updates))
        else:
            applied.append(old)
    for new in loaded.stores:
        if new.name not in old_names:
            restart.append(store_key(new.name))
            notes[store_key(new.name)] = "store added"

    config = msgspec.structs.replace(
        running,
        daemon=msgspec.structs.replace(running.daemon, **daemon_updates),
        stores=tuple(applied),
    )
    return ReloadPlan(
        config=config,
        live=tuple(live),
        restart=tuple(restart),
        stores=tuple(stores),
        notes=notes,
    )


def restart_message(plan: ReloadPlan, key: str) -> str:
    """One line for the log and ``goqctl status``: what changed and that it waits."""
    note = plan.notes.get(key)
    what = f"{key}: {note}" if note else f"{key} changed"
    return f"{what}; it takes effect when goqd is restarted"


def restart_keys(plan: ReloadPlan) -> tuple[str, ...]:
    """The keys that wait for a restart, each with its note: ``stores[x] (store added)``."""
    return tuple(f"{k} ({plan.notes[k]})" if k in plan.notes else k for k in plan.restart)


# --------------------------------------------------------------------------------------
# Applying a reload to the running daemon
# --------------------------------------------------------------------------------------


class Running(Protocol):
    """What a reload reads and changes of the running daemon (``goqd.app.Daemon``)."""

    config: Config
    handles: dict[str, StoreHandle]
    metrics: Metrics
    # What the last reload found: changed keys that wait for a restart, and why the
    # last reload was refused ("" once one succeeds).
    restart_needed: tuple[str, ...]
    reload_error: str


async def reload_config(daemon: Running, lock: trio.Lock) -> ReloadPlan | None:
    """Read the config file and every credential again; apply what may change live.

    The file and the credentials must pass the checks ``goqd run`` makes at start
    (``load_config``, ``check_host``, ``load_credentials``), or nothing changes: the
    refusal is logged once (``config_reload_refused``, naming the file, the key and
    the reason), counted (``goqd_config_reloads_total{outcome="refused"}``) and shown
    by ``goqctl status``, and the daemon runs on as it was. Otherwise the live keys
    (``goqd.reload``) take effect: each store whose settings or credential changed
    gets a new mall session through its handle (``StoreHandle.reconfigure``: a store
    stopped at level 9 stays stopped), and every other changed key is logged as
    ``config_key_needs_restart``. systemd hears ``RELOADING=1`` before and
    ``READY=1`` after, either way.

    Returns the plan applied, or None if the reload was refused.
    """
    async with lock:
        systemd.reloading("reloading the configuration")
        status = "reload failed"
        try:
            plan = await _reload(daemon)
            stores = f"{len(daemon.handles)} stores"
            if plan is None:
                status = f"{stores}; reload refused: {daemon.reload_error}"
            elif plan.restart:
                status = f"{stores}; reloaded, {len(plan.restart)} change(s) need a restart"
            else:
                status = f"{stores}; reloaded"
            return plan
        finally:
            systemd.ready(status)


async def _reload(daemon: Running) -> ReloadPlan | None:
    source = daemon.config.source
    # The stores' credential locks: a `goqctl key set`, or a token the mall renewed,
    # is written and handed to its store whole, before or after this reload.
    async with contextlib.AsyncExitStack() as locks:
        for name in sorted(daemon.handles):
            keeper = daemon.handles[name].credential_keeper
            if keeper is not None:
                await locks.enter_async_context(keeper.lock)
        try:
            if not source:
                raise ConfigError("<config>", "$", "the config was not read from a file")
            loaded, plan = await trio.to_thread.run_sync(_load_for_reload, daemon.config)
            fresh = await trio.to_thread.run_sync(_read_credentials, loaded, plan.config)
        except (GoqdError, OSError) as exc:
            _refuse_reload(daemon, source, str(exc))
            return None
        # Broad on purpose: a reload is a request to a daemon that is syncing stores;
        # a bug met while reading the files refuses the reload, it does not stop them.
        except Exception:
            log.exception("config_reload_failed", file=source)
            _refuse_reload(daemon, source, "internal error (logged as config_reload_failed)")
            return None
        _apply_reload(daemon, plan, fresh)
    return plan


def _refuse_reload(daemon: Running, source: str, reason: str) -> None:
    log.error(
        "config_reload_refused",
        file=source,
        error=reason,
        message="nothing changed: goqd runs on with the configuration it had; "
        "fix the file and reload again",
    )
    daemon.reload_error = reason
    daemon.metrics.config_reloads_total.labels("refused").inc()
    daemon.metrics.config_last_reload_successful.set(0)


def _apply_reload(daemon: Running, plan: ReloadPlan, fresh: dict[str, dict[str, Secret]]) -> None:
    """Apply ``plan`` and the credentials read with it (no await: all or nothing)."""
    old = daemon.config
    daemon.config = plan.config
    if plan.config.daemon.log_level != old.daemon.log_level:
        set_log_level(plan.config.daemon.log_level)
    restarted = []
    for name, handle in daemon.handles.items():
        cfg = plan.config.store(name)
        creds = _credentials_to_apply(name, handle, fresh.get(name))
        if cfg != old.store(name) or creds is not None:
            handle.reconfigure(cfg, creds if creds is not None else handle.credentials)
            restarted.append(name)
        if creds is not None:
            log.info(
                "credential_reloaded",
                store=name,
                message="the store stays stopped until its level-9 error is cleared: "
                f"goqctl errors clear --store {name}"
                if handle.state == "stopped"
                else "the store's new mall session uses it",
            )
    for key in plan.restart:
        log.warning("config_key_needs_restart", key=key, message=restart_message(plan, key))
    daemon.restart_needed = restart_keys(plan)
    daemon.reload_error = ""
    daemon.metrics.config_reloads_total.labels("ok").inc()
    daemon.metrics.config_last_reload_successful.set(1)
    daemon.metrics.config_restart_needed_keys.set(len(plan.restart))
    log.info(
        "config_reloaded",
        file=plan.config.source,
        applied=list(plan.live),
        restart_needed=list(plan.restart),
        sessions_restarted=restarted,
    )


def _credentials_to_apply(
    store: str, handle: StoreHandle, read: dict[str, Secret] | None
) -> dict[str, Secret] | None:
    """The credential just ``read`` from the store's file, if the store should take it.

    Only a file that changed since goqd last read or wrote it (``CredentialKeeper``):
    memory may be ahead of a file goqd wrote (a token the mall renewed, being written
    or not written at all), and the file's older token would be refused.
    """
    keeper = handle.credential_keeper
    if read is None or keeper is None:
        return None
    known, keeper.on_disk = keeper.on_disk, dict(read)
    if read == handle.credentials or read == known:
        return None
    return dict(read)


def _load_for_reload(running: Config) -> tuple[Config, ReloadPlan]:
    """The config file as ``goqd run`` would start with it, checked the same way, and
    what it changes in ``running``. Blocking file I/O: run it in a worker thread."""
    loaded = load_config(running.source)
    check_host(loaded)
    return loaded, plan_reload(running, loaded)


def _read_credentials(loaded: Config, applied: Config) -> dict[str, dict[str, Secret]]:
    """Every credential of ``loaded``, read and checked as at start (one bad file refuses
    the reload), returned for the running stores of ``applied`` that read it from the
    same file (not so when the mall or the state directory changed: both wait for the
    restart). Blocking file I/O: run it in a worker thread."""
    running = {s.name: s for s in applied.stores}
    fresh: dict[str, dict[str, Secret]] = {}
    for store in loaded.stores:
        creds = load_credentials(loaded, store)
        now = running.get(store.name)
        if (
            now is not None
            and now.mall == store.mall
            and credential_path(applied, now) == credential_path(loaded, store)
        ):
            fresh[store.name] = creds
    return fresh
