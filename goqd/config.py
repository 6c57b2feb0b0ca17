"""goqd's configuration: a TOML file decoded into frozen msgspec Structs.

Every error names the file, the key path (``$.stores[1].poll-interval``) and the
reason, and nothing starts. Secrets never sit in the TOML: each store names a JSON
credential file, read by ``load_credentials`` into ``Secret`` values; a credential file
readable by group or others is refused. A credential renewed with ``goqctl key set`` is
written to ``<state-dir>/credentials/<store>.json`` (mode 0600) and takes precedence
over the configured file from then on.

Environment overrides (for ``goqd@.service``, one instance per merchant):
``GOQD_STATE_DIR`` and ``GOQD_CONTROL_SOCKET`` replace ``daemon.state-dir`` and
``daemon.control-socket``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from goqd.errors import ConfigError, CredentialError
from goqd.secret import Secret

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Duration = Annotated[str, Meta(pattern=r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$")]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
OptionValue = str | int | float | bool


def seconds(duration: str) -> float:
    """``"3m"`` → 180.0. The pattern on ``Duration`` already rejected anything else."""
    match = _DURATION.match(duration)
    if match is None:
        raise ValueError(f"not a duration: {duration!r} (use e.g. 90s, 3m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class DaemonConfig(_Base, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/goqd"
    # The ledger file; empty means <state-dir>/goqd.db.
    ledger: str = ""
    control_socket: str = "/run/goqd/control.sock"
    # Groups (names) whose members may use the control socket besides root and the
    # daemon's own user.
    control_groups: tuple[str, ...] = ("goqd",)
    http_listen: str = "127.0.0.1:9464"
    # Only loopback by default: /metrics says which stores exist.
    http_public: bool = False
    base_store: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    synchronous: Literal["full", "normal", "extra"] = "full"
    stop_timeout: Duration = "25s"
    # Days before a credential expires that goqd starts warning.
    key_warning_days: Annotated[int, Meta(ge=0, le=90)] = 14

    @property
    def ledger_path(self) -> str:
        return self.ledger or os.path.join(self.state_dir, "goqd.db")

    @property
    def credentials_dir(self) -> str:
        return os.path.join(self.state_dir, "credentials")


class StoreConfig(_Base, frozen=True, kw_only=True):
    name: Name
    mall: str
    # The mall API's base URL. Production defaults live in each adapter's docs; the
    # simulators (goqd demo, tests) put loopback URLs here.
    base_url: Annotated[str, Meta(pattern=r"^https?://")]
    # JSON object with the mall's credential fields (see README); relative paths are
    # relative to the config file, a bare name is looked up in $CREDENTIALS_DIRECTORY.
    credentials: str
    poll_interval: Duration = "3m"
    # Retry interval for pushes the mall refused or could not take.
    push_retry: Duration = "30s"
    request_timeout: Duration = "30s"
    # Order statuses that count (as the mall spells them); empty = the mall's defaults.
    live_statuses: tuple[str, ...] = ()
    cancel_statuses: tuple[str, ...] = ()
    # Extra endpoints by name (token endpoints etc.).
    urls: dict[str, Annotated[str, Meta(pattern=r"^https?://")]] = {}
    # 紐づけ条件: how listing codes are compared with product SKUs (goqd.linking).
    # Empty = exact. Any of "nfkc" (full/half width), "casefold", "strip-spaces",
    # "strip-hyphens".
    link_normalize: tuple[Literal["nfkc", "casefold", "strip-spaces", "strip-hyphens"], ...] = ()
    # Amazon: lead time given to listings imported for the first time (DESIGN §2.3).
    default_lead_time: Annotated[int, Meta(ge=0, le=365)] | None = None
    # Mall-specific settings (link field, lookback days, location id …).
    options: dict[str, OptionValue] = {}
    paused: bool = False
    # Sale watch (goqd.stores.actor.watch_loop): how often to read the mall's own stock
    # counters of this store's low-stock listings. A counter that fell without an order
    # goqd has booked is a sale the order API does not show yet (Amazon shows orders ~2
    # minutes late); those units are held back from every other store until the order
    # is booked. "0s" turns the watch off.
    watch_interval: Duration = "5s"
    # Each round reads the listings of recently sold products first, then, in turn,
    # those whose product has at most this many units (oversells happen there), up to
    # the mall's per-round budget (goqd.malls.base.MallLimits.watch_max).
    watch_below: Annotated[int, Meta(ge=0, le=1_000_000)] = 10
    # A hold no order has explained by then is released and reported (the count was
    # probably edited at the mall).
    hold_expiry: Duration = "30m"

    @property
    def poll_seconds(self) -> float:
        return seconds(self.poll_interval)

    @property
    def watch_seconds(self) -> float:
        return seconds(self.watch_interval)

    @property
    def hold_expiry_seconds(self) -> float:
        return seconds(self.hold_expiry)

    @property
    def push_retry_seconds(self) -> float:
        return seconds(self.push_retry)

    @property
    def timeout_seconds(self) -> float:
        return seconds(self.request_timeout)


class Config(_Base, frozen=True, kw_only=True):
    daemon: DaemonConfig = DaemonConfig()
    stores: tuple[StoreConfig, ...] = ()
    # Where the file was read from; filled in by load_config.
    source: str = ""

    def store(self, name: str) -> StoreConfig:
        for s in self.stores:
            if s.name == name:
                return s
        raise KeyError(name)


_FRIENDLY = {
    "(ms|s|m|h|d)": "not a duration: use a number and a unit, e.g. 500ms, 90s, 3m, 1h",
    "{0,63}": "must be 1-64 characters: letters, digits, '_', '-', '.' (starting with a "
    "letter or digit)",
    "^https?://": "must be an http:// or https:// URL",
}


def _path_and_reason(exc: msgspec.ValidationError | msgspec.DecodeError) -> tuple[str, str]:
    text = str(exc)
    path = "$"
    if " - at `" in text:
        text, _, path = text.rpartition(" - at `")
        path = path.rstrip("`")
    if "matching regex" in text:
        for marker, friendly in _FRIENDLY.items():
            if marker in text:
                return path, friendly
    return path, text


def load_config(path: str | os.PathLike[str], *, env: dict[str, str] | None = None) -> Config:
    """Read, decode and check ``path``. Raises ``ConfigError`` naming file and key."""
    file = str(path)
    env = dict(os.environ) if env is None else env
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        raise ConfigError(file, "$", f"cannot read the config file: {exc.strerror}") from exc
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        key, reason = _path_and_reason(exc)
        raise ConfigError(file, key, reason) from exc
    daemon = config.daemon
    overrides: dict[str, Any] = {}
    if env.get("GOQD_STATE_DIR"):
        overrides["state_dir"] = env["GOQD_STATE_DIR"]
    if env.get("GOQD_CONTROL_SOCKET"):
        overrides["control_socket"] = env["GOQD_CONTROL_SOCKET"]
    if overrides:
        daemon = msgspec.structs.replace(daemon, **overrides)
    config = msgspec.structs.replace(config, daemon=daemon, source=os.path.abspath(file))
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Rules that span fields: unique names, known malls, limits, the base store."""
    from goqd.malls.registry import MALLS  # the registry imports adapters; keep it lazy

    file = config.source or "<config>"
    names: set[str] = set()
    for i, store in enumerate(config.stores):
        at = f"$.stores[{i}]"
        if store.name in names:
            raise ConfigError(file, f"{at}.name", f"store name {store.name!r} is used twice")
        names.add(store.name)
        spec = MALLS.get(store.mall)
        if spec is None:
            known = ", ".join(sorted(MALLS))
            raise ConfigError(file, f"{at}.mall", f"unknown mall {store.mall!r} (known: {known})")
        for key, value in (
            ("poll-interval", store.poll_interval),
            ("push-retry", store.push_retry),
            ("request-timeout", store.request_timeout),
            ("hold-expiry", store.hold_expiry),
        ):
            if seconds(value) <= 0:
                raise ConfigError(file, f"{at}.{key}", "must be more than 0")
        if store.poll_seconds < spec.limits.min_poll_interval:
            raise ConfigError(
                file,
                f"{at}.poll-interval",
                f"{store.poll_interval} is faster than {spec.title}'s rate limit allows "
                f"(at least {spec.limits.min_poll_interval:g}s)",
            )
    if config.daemon.base_store and config.daemon.base_store not in names:
        raise ConfigError(
            file, "$.daemon.base-store", f"no store named {config.daemon.base_store!r}"
        )
    if not config.daemon.http_public:
        host = config.daemon.http_listen.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError(
                file,
                "$.daemon.http-listen",
                f"{host} is not loopback; set http-public = true to expose /metrics there",
            )


def credential_path(config: Config, store: StoreConfig, env: dict[str, str] | None = None) -> str:
    """Where this store's credential is read from (renewed copy first)."""
    env = dict(os.environ) if env is None else env
    renewed = os.path.join(config.daemon.credentials_dir, f"{store.name}.json")
    if os.path.exists(renewed):
        return renewed
    name = store.credentials
    creds_dir = env.get("CREDENTIALS_DIRECTORY")
    if creds_dir and os.sep not in name and os.path.exists(os.path.join(creds_dir, name)):
        return os.path.join(creds_dir, name)
    base = os.path.dirname(config.source) if config.source else os.getcwd()
    return os.path.normpath(os.path.join(base, name))


def load_credentials(
    config: Config, store: StoreConfig, env: dict[str, str] | None = None
) -> dict[str, Secret]:
    """Read the store's credential file. Refuses group/world-readable files."""
    from goqd.malls.registry import MALLS

    path = credential_path(config, store, env)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CredentialError(
            path,
            "$",
            f"credential file for store {store.name!r} is missing or unreadable: {exc.strerror}",
        ) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(
            path,
            "$",
            f"credential file for store {store.name!r} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
        )
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        # The decoder's message could quote the file's content: keep it out.
        raise CredentialError(path, "$", "not a readable JSON object") from exc
    return parse_credentials(path, store.mall, data, MALLS[store.mall].credential_fields)


def parse_credentials(
    where: str, mall: str, data: object, fields: tuple[str, ...]
) -> dict[str, Secret]:
    """Check a credential object's shape; every value becomes a ``Secret``."""
    if not isinstance(data, dict):
        raise CredentialError(where, "$", "credentials must be a JSON object")
    missing = [f for f in fields if not isinstance(data.get(f), str) or not data.get(f)]
    if missing:
        raise CredentialError(where, f"$.{missing[0]}", f"missing for mall {mall!r}")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise CredentialError(where, f"$.{bad[0]}", "every credential value must be a string")
    from goqd.logs import register_secret  # logs imports nothing of config; keep it lazy

    for value in data.values():
        register_secret(value)  # second line of defence: masked in any log text
    return {k: Secret(v) for k, v in data.items()}


def write_credentials(config: Config, store: str, data: dict[str, str]) -> str:
    """Store a renewed credential 0600 in the state directory, atomically."""
    directory = config.daemon.credentials_dir
    os.makedirs(directory, mode=0o700, exist_ok=True)
    final = os.path.join(directory, f"{store}.json")
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final
