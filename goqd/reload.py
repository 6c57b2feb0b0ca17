"""What a reload (``systemctl reload goqd``, SIGHUP) may change in a running daemon.

``plan_reload(running, loaded)`` compares the config the daemon runs with the file as
it was just loaded and checked, key by key. A changed key is either *live* (the running
daemon takes the new value now) or needs a *restart*; the plan's ``config`` is the
running config with the live changes only, so it always describes what the daemon
actually does. Nothing here reads a file, a clock or a handle: ``goqd.app.Daemon.reload``
loads, checks and applies.

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

from dataclasses import dataclass
from typing import Any

import msgspec

from goqd.config import Config, DaemonConfig, StoreConfig

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
