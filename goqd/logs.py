"""Logging for goqd: structlog, JSON lines for journald, a console view on a TTY.

``configure_logging()`` is called once by the CLI. Both structlog's loggers and the
standard library's (httpx, hypercorn) end in one handler whose
``ProcessorFormatter`` runs the same chain: context variables, level, ISO UTC
timestamp, exception formatting, **redaction**, renderer.

Redaction is the last step before rendering, after exceptions have become text, so
it also covers tracebacks and exception messages:

* the value of any key whose name looks secret (``license_key``, ``token``,
  ``authorization``, ``password``, ...) at any depth becomes ``"***"``;
* every value registered with ``register_secret()`` is replaced by ``"***"`` wherever
  it appears inside a string, at any depth. goqd registers the *secret* fields of every
  credential it loads (``MallSpec.secret_fields``: not seller ids or issue dates, which
  would otherwise mask order ids and timestamps), the forms they take on the wire (the
  Rakuten ESA header's base64) and the access tokens adapters obtain at run time;
* a credential in a header-like text that was never registered (``Authorization:
  Bearer …``, ``x-amz-access-token: …``, ``access_token=…``) loses its value too.

Values shorter than ``MIN_SECRET_LENGTH`` are not registered (``register_secret``
returns False and the loader warns): they would mask ordinary words and numbers all
over the logs, and no real mall credential is that short. Such a value is still never
logged as such: it lives in a ``Secret``.

This module must never log, print or keep a secret anywhere but the in-memory set
that redaction matches against.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import quote

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from goqd.secret import Secret

MASK = "***"

# Key names whose values are secret whatever they contain (compared after lowercasing
# and turning "-" into "_", so "License-Key" and "licenseKey" style both match).
SECRET_KEYS = frozenset(
    {
        "license_key",
        "licensekey",
        "service_secret",
        "servicesecret",
        "secret",
        "token",
        "access_token",
        "accesstoken",
        "refresh_token",
        "refreshtoken",
        "client_secret",
        "clientsecret",
        "api_key",
        "apikey",
        "authorization",
        "password",
        "credentials",
        "credential",
        "cookie",
        "set_cookie",
        "x_shopify_access_token",
    }
)
_SECRET_SUFFIXES = ("_secret", "_token", "_password", "_api_key", "_license_key")

# Shorter values would mask ordinary words and numbers all over the logs; no real
# credential is this short.
MIN_SECRET_LENGTH = 6

# Tokens minted at run time (an access token an hour per store) are kept for this many
# registrations, not for ever: the pattern would otherwise grow without bound. An
# access token lives an hour; 4096 is days of them for 50 stores.
TRANSIENT_SECRETS_MAX = 4096

# Credentials in header-like text nobody registered (a mall echoing our request, an
# exception quoting a header): the name stays, the value goes.
_WIRE_SECRET = re.compile(
    r"(?i)(\b(?:authorization|proxy-authorization)\s*[:=]\s*\"?(?:bearer|basic|esa)\s+"
    r"|\bbearer\s+"
    r"|\b(?:x-amz-access-token|x-shopify-access-token|access_token|refresh_token"
    r"|client_secret|licenseKey|serviceSecret)\"?\s*[:=]\s*\"?)"
    r"([A-Za-z0-9._~+/|%-]{8,}=*)"
)

_secrets: set[str] = set()
_transient: OrderedDict[str, None] = OrderedDict()
_pattern: re.Pattern[str] | None = None
# Compiled when the next line is masked, not at every registration: 50 stores register
# ~190 values, and compiling an ever longer pattern at each took 1.2 s at start (one
# compile of all of them: 16 ms).
# The lock keeps a registration from slipping between a compile and its flag.
_pattern_stale = False
_pattern_lock = threading.Lock()

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def register_secret(value: str | Secret, *, transient: bool = False) -> bool:
    """Mask ``value`` (and its URL-encoded forms) in every log line from now on.

    ``transient``: a token minted at run time; only the latest ``TRANSIENT_SECRETS_MAX``
    such values are kept. Returns False for a value too short to mask (see above).
    """
    global _pattern_stale
    raw = value.reveal() if isinstance(value, Secret) else value
    if len(raw) < MIN_SECRET_LENGTH:
        return False
    forms = {raw, quote(raw, safe=""), quote(raw)}
    with _pattern_lock:
        if transient:
            if forms <= _secrets or forms <= _transient.keys():
                return True
            for form in forms:
                _transient[form] = None
            while len(_transient) > TRANSIENT_SECRETS_MAX:
                _transient.popitem(last=False)
        else:
            if forms <= _secrets:
                return True
            _secrets.update(forms)
        _pattern_stale = True
    return True


def _current_pattern() -> re.Pattern[str] | None:
    global _pattern, _pattern_stale
    if _pattern_stale:
        with _pattern_lock:
            if _pattern_stale:
                # Longest first, so a secret containing another is masked whole.
                ordered = sorted(_secrets | _transient.keys(), key=len, reverse=True)
                _pattern = re.compile("|".join(re.escape(s) for s in ordered))
                _pattern_stale = False
    return _pattern


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return k in SECRET_KEYS or k.endswith(_SECRET_SUFFIXES)


def _mask_text(text: str) -> str:
    pattern = _current_pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _WIRE_SECRET.sub(lambda m: m.group(1) + MASK, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Secret):
        return MASK
    if depth > 20:
        # Pathologically deep (or self-referencing) data: give up on structure.
        return _mask_text(str(value))
    if isinstance(value, Mapping):
        return {
            _redact_value(k, depth + 1): MASK if _is_secret_key(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return _mask_text(value.decode("utf-8", "replace"))
    # Anything else (exceptions, records, paths) is rendered to text here, so that the
    # renderer's own repr() cannot reintroduce a secret after masking.
    return _mask_text(str(value))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-looking keys and registered secret values."""
    out: EventDict = {}
    for key, value in event_dict.items():
        if key.startswith("_"):
            # ProcessorFormatter's private keys (_record, _from_structlog) are
            # removed before rendering; leave them intact for it.
            out[key] = value
        elif _is_secret_key(key):
            out[key] = MASK
        else:
            out[key] = _redact_value(value)
    return out


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


_HANDLER_MARK = "_goqd_handler"
# httpx logs every request at INFO: these log only warnings and above.
QUIET_LOGGERS = ("httpx", "httpcore", "hypercorn.access")


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    quiet_loggers: Iterable[str] = QUIET_LOGGERS,
) -> None:
    """Configure structlog and the stdlib root logger; safe to call again.

    ``json=None`` picks JSON unless ``stream`` is a TTY. Loggers in ``quiet_loggers``
    log only warnings and above (httpx logs every request at INFO).
    """
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    numeric = _LEVELS[level.lower()]
    stream = stream if stream is not None else sys.stdout
    if json is None:
        isatty = getattr(stream, "isatty", None)
        json = not (callable(isatty) and isatty())

    renderer: Processor = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Exceptions become text before redaction so their messages are masked too.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: configure_logging() may run again (tests, check-config then run).
        cache_logger_on_first_use=False,
    )


def set_log_level(level: str, *, quiet_loggers: Iterable[str] = QUIET_LOGGERS) -> None:
    """Change the level ``configure_logging`` set, and nothing else (a reload).

    structlog filters by the stdlib root logger's level, so one ``setLevel`` is enough.
    """
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    numeric = _LEVELS[level.lower()]
    logging.getLogger().setLevel(numeric)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
