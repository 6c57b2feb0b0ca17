"""goqd's configuration: a TOML file decoded into frozen msgspec Structs.

Every error names the file, the key path (``$.stores[1].poll-interval``) and the
reason, and nothing starts. Secrets never sit in the TOML: each store names a JSON
credential file, read by ``load_credentials`` into ``Secret`` values; a credential file
readable by group or others is refused. A credential renewed with ``goqctl key set`` is
written to ``<state-dir>/credentials/<store>.json`` (mode 0600) and takes precedence
over the configured file from then on.

``check_host`` checks what the file alone cannot tell (the control groups exist, the
state, ledger and control socket directories can be written); ``goqd run`` and ``goqd
check-config`` both call it.

Environment overrides (for ``goqd@.service``, one instance per merchant):
``GOQD_STATE_DIR`` and ``GOQD_CONTROL_SOCKET`` replace ``daemon.state-dir`` and
``daemon.control-socket``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import stat
import threading
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
    # daemon's own user. Every group named must exist on the host (``check_host``): a
    # misspelt group would otherwise admit nobody without a word. None by default, so a
    # host without a "goqd" group can run a config that does not name one; the example
    # config and the operator guide name "goqd".
    control_groups: tuple[str, ...] = ()
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
    # Amazon: replaces the mall's lead time for listings new to goqd at import; a lead
    # time goqd knows is never changed by an import (catalogue.import_listings in
    # goqd.ledger).
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
    # The mall's clock (the Date of its responses) may be this far from goqd's before the
    # store is degraded (level 8, clock_skew) and no hold is released as unexplained.
    # Orders are searched by the mall's clock either way.
    clock_skew_limit: Duration = "60s"

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
    def clock_skew_seconds(self) -> float:
        return seconds(self.clock_skew_limit)

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


# A config of a thousand stores is ~200 KiB; a credential file a few hundred bytes. The
# caps keep a mistyped path (a log, /dev/zero) from being read into memory whole.
_MAX_CONFIG_BYTES = 4 << 20
_MAX_CREDENTIAL_BYTES = 64 << 10


def _read_small_file(file: str, limit: int, error: type[ConfigError], what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or ``error`` saying why not.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer for ever.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except ValueError:  # an embedded NUL in the path
        raise error(file, "$", f"cannot read {what}: the path contains a NUL character") from None
    except OSError as exc:
        raise error(file, "$", _open_failure(exc, file, what)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(file, "$", f"cannot read {what}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise error(file, "$", f"cannot read {what}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(file, "$", _open_failure(exc, file, what)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(file, "$", f"{what} is larger than {limit >> 10} KiB; is this the right file?")
    return data


def _open_failure(exc: OSError, file: str, what: str) -> str:
    """Why ``file`` could not be opened, in words an operator can act on."""
    if isinstance(exc, PermissionError):
        return (
            f"permission denied reading {what} as user {running_user()}; make {file} readable "
            f"by that user (it should own the file, mode 0600)"
        )
    if isinstance(exc, FileNotFoundError):
        return f"{what} is missing: no such file"
    if isinstance(exc, IsADirectoryError):
        return f"cannot read {what}: it is a directory"
    if isinstance(exc, NotADirectoryError):
        return f"cannot read {what}: a part of its path is not a directory"
    return f"cannot read {what}: {exc.strerror or exc}"


def running_user() -> str:
    """The user this process runs as, for messages: ``'goqd' (uid 998)``."""
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def load_config(path: str | os.PathLike[str], *, env: dict[str, str] | None = None) -> Config:
    """Read, decode and check ``path``. Raises ``ConfigError`` naming file and key."""
    file = str(path)
    env = dict(os.environ) if env is None else env
    raw = _read_small_file(file, _MAX_CONFIG_BYTES, ConfigError, "the config file")
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        key, reason = _path_and_reason(exc)
        raise ConfigError(file, key, reason) from exc
    except RecursionError:  # the TOML parser recurses into nested arrays and tables
        raise ConfigError(file, "$", "arrays or tables nested too deeply") from None
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
            ("watch-interval", store.watch_interval),
        ):
            if seconds(value) <= 0 and key != "watch-interval":  # "0s" turns the watch off
                raise ConfigError(file, f"{at}.{key}", "must be more than 0")
            _check_duration_bound(file, f"{at}.{key}", value)
        if store.poll_seconds < spec.limits.min_poll_interval:
            raise ConfigError(
                file,
                f"{at}.poll-interval",
                f"{store.poll_interval} is faster than {spec.title}'s rate limit allows "
                f"(at least {spec.limits.min_poll_interval:g}s)",
            )
        # The mall's own options: refused here, not by a store crash-looping at run time.
        from goqd.malls.base import option_problem

        problem = option_problem(spec, store.options)
        if problem is not None:
            raise ConfigError(file, f"{at}.options.{problem[0]}", problem[1])
    if config.daemon.base_store and config.daemon.base_store not in names:
        raise ConfigError(
            file, "$.daemon.base-store", f"no store named {config.daemon.base_store!r}"
        )
    _check_daemon(file, config.daemon)


# Far beyond any sensible interval, and far below what socket timeouts and trio
# deadlines can hold: a duration of 400 digits is valid and parses to infinity.
_MAX_DURATION_S = 30 * 86400.0
# sun_path is 108 bytes with the terminating NUL; bind() refuses anything longer.
_MAX_SOCKET_PATH = 107


def _check_duration_bound(file: str, key: str, value: str) -> None:
    if not seconds(value) <= _MAX_DURATION_S:  # "not <=" also catches inf and nan
        raise ConfigError(file, key, f"{value} is too long (at most 30d)")


def _check_daemon(file: str, daemon: DaemonConfig) -> None:
    """The daemon table's values that would otherwise fail at start with an OS error or a
    traceback (a port above 65535, an unbracketed IPv6 address, a socket path too long)."""
    if seconds(daemon.stop_timeout) <= 0:
        raise ConfigError(file, "$.daemon.stop-timeout", "must be more than 0")
    _check_duration_bound(file, "$.daemon.stop-timeout", daemon.stop_timeout)
    if not daemon.state_dir:
        raise ConfigError(file, "$.daemon.state-dir", "must not be empty")
    for key, value in (
        ("state-dir", daemon.state_dir),
        ("ledger", daemon.ledger),
        ("control-socket", daemon.control_socket),
    ):
        if "\x00" in value:
            raise ConfigError(file, f"$.daemon.{key}", "a path cannot contain a NUL character")
    if not daemon.control_socket:
        raise ConfigError(file, "$.daemon.control-socket", "must not be empty")
    if len(os.fsencode(daemon.control_socket)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            file,
            "$.daemon.control-socket",
            f"longer than {_MAX_SOCKET_PATH} bytes, the limit of a Unix socket path",
        )
    for i, group in enumerate(daemon.control_groups):
        if not group or "\x00" in group:
            raise ConfigError(file, f"$.daemon.control-groups[{i}]", "not a group name")
    try:
        host, _ = listen_address(daemon.http_listen)
    except ValueError as exc:
        raise ConfigError(file, "$.daemon.http-listen", str(exc)) from None
    if not daemon.http_public and not is_loopback(host):
        raise ConfigError(
            file,
            "$.daemon.http-listen",
            f"{host} is not loopback; set http-public = true to expose /metrics there",
        )


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


def listen_address(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` or ``"localhost:9464"`` -> (host, port).

    The one parser of ``daemon.http-listen``: the config check and ``goqd.http`` both
    use it. Raises ``ValueError`` with a one-line reason that quotes the address or its
    part at fault (shortened: a refusal stays one readable line however long the value).
    Port 0 asks the kernel for any free port (tests and ``goqd demo`` use it).
    """
    shown = _short(listen)
    if listen.startswith("["):
        inside, bracket, rest = listen[1:].partition("]")
        if not bracket:
            raise ValueError(f"{shown!r}: missing ']' after the IPv6 address")
        try:
            address = ipaddress.ip_address(inside)
        except ValueError:
            raise ValueError(f"{_short(inside)!r} is not an IPv6 address") from None
        if address.version != 6:
            raise ValueError(
                f"{shown!r}: brackets are for IPv6 addresses; write {_short(inside + rest)}"
            )
        if not rest.startswith(":"):
            raise ValueError(f"{shown!r} is not [host]:port (e.g. [::1]:9464)")
        host, port_text = inside, rest[1:]
    else:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{shown!r} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)")
        if ":" in host:
            raise ValueError(f"{shown!r}: write IPv6 addresses in brackets, e.g. [::1]:9464")
        if len(host) > 253 or not _HOSTNAME.match(host):
            raise ValueError(f"{_short(host)!r} is not an IP address or host name")
    # int() would also take " 80", "+80", "8_0" and other scripts' digits.
    ascii_digits = port_text.isascii() and port_text.isdigit()
    if not ascii_digits or len(port_text) > 5 or int(port_text) > 65535:
        raise ValueError(f"{shown!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_loopback(host: str) -> bool:
    """True for a host ``listen_address`` returned that only this machine can reach."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1
    return address.is_loopback


def check_host(config: Config) -> None:
    """What the file alone cannot tell, checked by ``goqd run`` and ``goqd check-config``
    alike: every control group exists on this host; the daemon can write in its state
    directory, in the ledger's directory and in the control socket's (or create them);
    and nothing but a socket sits where the control socket goes.

    Raises ``ConfigError`` naming the key. Creates nothing that stays behind.
    """
    file = config.source or "<config>"
    daemon = config.daemon
    control_group_ids(daemon.control_groups, file)
    _check_writable(file, "$.daemon.state-dir", daemon.state_dir)
    ledger_dir = os.path.dirname(os.path.abspath(daemon.ledger_path))
    if ledger_dir != os.path.abspath(daemon.state_dir):
        _check_writable(file, "$.daemon.ledger", ledger_dir)
    # A leftover socket is replaced at start (if nobody listens on it); anything else
    # there would be refused by the control server only after the ledger was opened.
    sock = daemon.control_socket
    if os.path.lexists(sock) and not stat.S_ISSOCK(os.lstat(sock).st_mode):
        raise ConfigError(file, "$.daemon.control-socket", f"{sock} exists and is not a socket")
    _check_writable(file, "$.daemon.control-socket", os.path.dirname(os.path.abspath(sock)))


def control_group_ids(names: tuple[str, ...], file: str = "<config>") -> frozenset[int]:
    """The ids of ``daemon.control-groups``; ``ConfigError`` for a group this host lacks."""
    import grp

    ids = set()
    for i, name in enumerate(names):
        try:
            ids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            raise ConfigError(
                file,
                f"$.daemon.control-groups[{i}]",
                f"there is no group {name!r} on this host, so it would admit nobody: "
                f"create it (groupadd {name}) or remove it from the list",
            ) from None
    return frozenset(ids)


def probe_writable_dir(directory: str) -> None:
    """Create and remove a file in ``directory``; ``OSError`` if that is not possible.

    A real write, not ``os.access``: root passes every access check, yet cannot write on
    a read-only mount or in an immutable directory.
    """
    probe = os.path.join(directory, f".goqd-probe-{os.getpid()}-{os.urandom(4).hex()}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(probe)


def _check_writable(file: str, key: str, directory: str) -> None:
    """``directory`` can be written in, or created by ``os.makedirs``."""
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise ConfigError(file, key, f"{existing} is not a directory")
        existing = os.path.dirname(existing)
    try:
        probe_writable_dir(existing)
    except OSError as exc:
        verb = "write in" if existing == os.path.abspath(directory) else "create directories in"
        raise ConfigError(
            file,
            key,
            f"cannot {verb} {existing}: {exc.strerror or exc}; goqd runs as user "
            f"{running_user()} and keeps its ledger and renewed credentials there",
        ) from None


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
    """Read the store's credential file. Refuses group/world-readable files.

    Each refusal says which of these it is: missing, permission denied (naming the user
    goqd runs as), a directory or other non-file, readable by others, too large, not
    UTF-8, not JSON (line and column only: the decoder's text could quote a secret), or
    the wrong shape (``parse_credentials``).
    """
    from goqd.malls.registry import MALLS

    path = credential_path(config, store, env)
    what = f"the credential file of store {store.name!r}"
    try:
        st = os.stat(path)
    except ValueError:  # an embedded NUL in the configured name
        raise CredentialError(path, "$", f"{what}: the path contains a NUL character") from None
    except OSError as exc:
        raise CredentialError(path, "$", _open_failure(exc, path, what)) from None
    if stat.S_ISDIR(st.st_mode):
        raise CredentialError(path, "$", f"cannot read {what}: it is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(path, "$", f"cannot read {what}: not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(
            path,
            "$",
            f"credential file for store {store.name!r} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
        )
    raw = _read_small_file(path, _MAX_CREDENTIAL_BYTES, CredentialError, what)
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        raise CredentialError(
            path, "$", f"{what} is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # Only the decoder's fixed message and the position: its full text, or the
        # document, could quote a secret.
        raise CredentialError(
            path,
            "$",
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
        ) from None
    except (ValueError, RecursionError):  # a 5,000-digit number, [[[[...]]]]
        raise CredentialError(path, "$", f"{what} is not valid JSON") from None
    return parse_credentials(path, store.mall, data, MALLS[store.mall].credential_fields)


def parse_credentials(
    where: str, mall: str, data: object, fields: tuple[str, ...]
) -> dict[str, Secret]:
    """Check a credential object's shape; every value becomes a ``Secret``.

    The values of the mall's secret fields (``MallSpec.secret_fields``; every field for
    a mall the registry does not know) are registered with the log redactor, a second
    line of defence: a seller id or an issue date is not, or it would mask order ids and
    timestamps in every log line. A secret too short to mask is warned about by name.
    """
    if not isinstance(data, dict):
        raise CredentialError(where, "$", "credentials must be a JSON object")
    missing = [f for f in fields if not isinstance(data.get(f), str) or not data.get(f)]
    if missing:
        raise CredentialError(where, f"$.{missing[0]}", f"missing for mall {mall!r}")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise CredentialError(where, f"$.{bad[0]}", "every credential value must be a string")
    import structlog

    from goqd.logs import register_secret  # logs imports nothing of config; keep it lazy
    from goqd.malls.registry import MALLS  # the registry imports adapters; keep it lazy

    spec = MALLS.get(mall)
    for key, value in data.items():
        secret = spec is None or spec.is_secret_field(key)
        if secret and value and not register_secret(value):
            structlog.get_logger("goqd.config").warning(
                "credential_too_short_to_mask", where=where, field=key
            )
    return {k: Secret(v) for k, v in data.items()}


# One writer at a time in this process: ``goqctl key set`` and a refresh token a mall
# rotated may be written at once, and both go through one temporary file name.
_CREDENTIAL_WRITE = threading.Lock()


def write_credentials(config: Config, store: str, data: dict[str, str]) -> str:
    """Store a renewed credential 0600 in the state directory, atomically."""
    return write_credential_file(config.daemon.credentials_dir, store, data)


def write_credential_file(directory: str, store: str, data: dict[str, str]) -> str:
    """Write ``<directory>/<store>.json`` 0600, atomically and durably; return its path.

    A reader (a restart) sees the old file or the new one, never a mix. The directory is
    synced too: a rename lost in a power cut would bring back a refresh token the mall
    may no longer take. ``OSError`` (read-only, disk full) leaves the old file as it was
    and no temporary file behind.
    """
    final = os.path.join(directory, f"{store}.json")
    tmp = final + ".tmp"
    with _CREDENTIAL_WRITE:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        replaced = False
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o600)  # a leftover temporary file keeps its own mode otherwise
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            replaced = True
        finally:
            if not replaced:  # half a credential must not stay on disk
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return final
