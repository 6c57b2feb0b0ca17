"""goqctl: the operator's command line for a running goqd, over its control socket.

Every command builds one control request, sends it (``goqd.control.call_sync``) and
prints the result: aligned tables for people (East-Asian-width aware, so 商品名 columns
line up), or the result as JSON with ``--json``. Errors go to stderr and say what to do
next. Exit codes: 0 ok, 1 the daemon refused (or a local file could not be used), 2
usage, 3 daemon unreachable.

This module must never print, log or echo a credential read for ``key set``, and never
change anything itself: everything goes through the daemon.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import math
import os
import shlex
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from goqd import expiry
from goqd import messages as m
from goqd.control import protocol as p
from goqd.control.client import DaemonUnreachable, RemoteError, call_sync, new_request_id
from goqd.csvio import decode_csv_bytes
from goqd.errors import ControlError, InputError

DEFAULT_SOCKET = "/run/goqd/control.sock"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# Work that reads or writes a whole catalogue at the mall's rate limit takes minutes.
LONG_TIMEOUT = 3600.0
DEFAULT_TIMEOUT = 30.0
KEY_TIMEOUT = 120.0  # key set tests the credential against the mall first
MAX_CREDENTIAL_BYTES = 64 * 1024
NAME_WIDTH = 40  # display cells for product/listing names and messages in tables


class _LocalError(Exception):
    """goqctl could not build the request (unreadable file, bad credential JSON)."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)


class _Usage(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        self.parser = parser
        self.message = message
        super().__init__(message)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flushed here, not at interpreter exit, where a closed pipe is a traceback.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`goqctl listings S | head`): nothing is left to say, and
        # Python's own flush at exit must not fail on the same pipe again.
        _stdout_to_devnull()
        return EXIT_ERROR
    return code


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # stdout is not a real file (tests capture it): nothing will flush it


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["completion"]:
        # `goqctl completion bash` / `zsh`: needs no daemon, so it is not a request.
        if args_in[1:] not in (["bash"], ["zsh"]):
            print("usage: goqctl completion bash|zsh", file=sys.stderr)
            return EXIT_USAGE
        print(completion_script(parser, args_in[1]))
        return EXIT_OK
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        try:
            request = _request_from(args)
        except ValueError as exc:  # a request's own __post_init__ check (dates, ...)
            raise _Usage(args._parser, f"invalid argument: {exc}") from None
        _validate(request, args._parser)
    except _Usage as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except _LocalError as exc:
        _report(args, "local", exc.message, exc.hint)
        return EXIT_ERROR
    timeout = args.timeout if args.timeout is not None else _timeout_for(request)
    try:
        # One id per invocation: call() reuses it when it resends after a broken
        # connection, so a mutating request is applied at most once.
        result = call_sync(args.socket, request, timeout=timeout, request_id=new_request_id())
    except DaemonUnreachable as exc:
        _report(args, "unreachable", str(exc), exc.hint)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        _report(args, exc.code, exc.message, exc.hint or _fallback_hint(exc.code, request))
        return EXIT_ERROR
    except ControlError as exc:
        _report(args, "client", str(exc), "")
        return EXIT_ERROR
    try:
        text = msgspec.json.encode(result).decode() if args.json else _render(result, request, args)
    except (ValueError, OverflowError, OSError) as exc:
        # A reply with values no table can show (a timestamp of 1e300): say so, don't crash.
        _report(args, "client", f"cannot show the daemon's reply: {exc}", "try --json")
        return EXIT_ERROR
    print(text)
    return EXIT_OK


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A completion script built from goqctl's own parser, so it never goes stale.

    Install: ``goqctl completion bash > /etc/bash_completion.d/goqctl`` (zsh: put
    ``eval "$(goqctl completion zsh)"`` in ~/.zshrc; it uses bashcompinit).
    """
    top = _subcommands(parser)
    cases = []
    for name, sub in sorted(top.items()):
        words = sorted(_subcommands(sub)) + _options(sub)
        cases.append(f'        {name}) words="{" ".join(words)}" ;;')
    body = "\n".join(cases)
    script = f"""# goqctl {shell} completion (generated by `goqctl completion {shell}`)
_goqctl() {{
    local cur words cmd i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [ -z "$cmd" ]; then
        words="{" ".join([*sorted(top), "completion", *_options(parser)])}"
    else
        case "$cmd" in
{body}
        completion) words="bash zsh" ;;
        *) words="" ;;
        esac
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _goqctl goqctl"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _report(args: argparse.Namespace, code: str, message: str, hint: str) -> None:
    if args.json:
        print(msgspec.json.encode(p.Err(code=code, message=message, hint=hint)).decode())
    print(f"goqctl: {message}", file=sys.stderr)
    if hint:
        print(f"  → {hint}", file=sys.stderr)


def _fallback_hint(code: str, request: p.ControlRequest) -> str:
    if code == "not_allowed":
        # Only an older daemon answers without a hint; it alone knows its admin group.
        return (
            "ask an administrator to add your user to a group listed in the daemon's "
            "daemon.control-groups, or run goqctl as root"
        )
    if code == "unsupported_version":
        return "goqctl and goqd differ in version: use the goqctl installed with this goqd"
    if code == "not_found":
        if getattr(request, "sku", ""):
            return "see `goqctl products` for the SKUs goqd knows"
        if getattr(request, "store", ""):
            return "see `goqctl stores` for the configured stores"
    if code == "unavailable":
        return "try again in a moment"
    if code == "internal":
        return "see the daemon's log (`journalctl -u goqd`)"
    return ""


def _timeout_for(request: p.ControlRequest) -> float:
    if isinstance(request, p.Import | p.Diff | p.Reflect | p.LinkAuto | p.StockImport):
        return LONG_TIMEOUT
    if isinstance(request, p.KeySet):
        return KEY_TIMEOUT
    return DEFAULT_TIMEOUT


_request_checker = msgspec.json.Decoder(p.ControlRequest)


def _validate(request: p.ControlRequest, parser: argparse.ArgumentParser) -> None:
    """Check the request against the protocol's constraints before sending it.

    msgspec validates only when decoding, so a round trip is the check; it makes a bad
    argument a usage error here instead of a ``bad_request`` from the daemon.
    """
    _check_text(request, parser)
    body = msgspec.json.encode(request)
    if len(body) > p.MAX_REQUEST_BYTES - 1024:
        raise _LocalError(
            f"the request is {len(body) // 1024} KiB; the control socket takes at most "
            f"{p.MAX_REQUEST_BYTES // 1024} KiB per request",
            "split the file into smaller files and import them one after another",
        )
    try:
        _request_checker.decode(body)
    except msgspec.ValidationError as exc:
        raise _Usage(parser, f"invalid argument: {exc}") from None


def _check_text(request: p.ControlRequest, parser: argparse.ArgumentParser) -> None:
    """Refuse text that is not valid Unicode before it reaches the encoder.

    Python hands a command-line argument that is not valid UTF-8 over with its bad bytes
    as lone surrogates (surrogateescape); the request is UTF-8 JSON, so such a value
    cannot be sent. File names are not checked: they are opened here, never sent.
    """
    for name in request.__struct_fields__:
        value = getattr(request, name)
        if isinstance(value, dict):
            texts = [*value.keys(), *value.values()]
        elif isinstance(value, tuple):
            texts = list(value)
        else:
            texts = [value]
        for text in texts:
            if isinstance(text, str) and not _is_utf8(text):
                shown = "(not shown)" if name == "credentials" else _shown(text)
                raise _Usage(
                    parser,
                    f"invalid argument: {name} {shown} is not valid UTF-8 text; "
                    "check the terminal's or the script's encoding",
                )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str) -> str:
    """``text`` with its undecodable bytes as ``\\xff`` escapes, quoted and clipped."""
    try:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that was no byte (from JSON "\\ud800")
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"'{_clip(shown, 80)}'"


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def _default_socket() -> str:
    # GOQD_CONTROL_SOCKET is what the daemon itself reads (and goqd@.service sets).
    return os.environ.get("GOQD_SOCKET") or os.environ.get("GOQD_CONTROL_SOCKET") or DEFAULT_SOCKET


def _build_parser() -> argparse.ArgumentParser:
    # Options accepted before or after the command; SUPPRESS keeps a subcommand from
    # overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS")

    parser = argparse.ArgumentParser(
        prog="goqctl",
        description="Control a running goqd (stock sync across Japanese malls).",
        epilog="exit codes: 0 ok, 1 error reply, 2 usage, 3 daemon unreachable",
    )
    parser.add_argument(
        "--socket",
        default=_default_socket(),
        metavar="PATH",
        help=f"control socket (default: $GOQD_SOCKET or {DEFAULT_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        sub: Any, name: str, help_: str, *, usage: str | None = None
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(
            name, help=help_, description=help_, parents=[common], usage=usage
        )
        sp.set_defaults(_parser=sp)
        return sp

    add(cmds, "status", "daemon, stores and ledger at a glance")
    add(cmds, "stores", "every store's state, error level, last poll and push, key expiry")

    errors = add(
        cmds,
        "errors",
        "open errors (エラー), highest level first, then newest",
        usage="goqctl errors [--store S] [--level 8|9] [--code C] [--all] [--after ID] "
        "[--limit N]\n       goqctl errors clear (ID ...|--store S)",
    )
    errors.add_argument("--store", default="", help="only this store")
    errors.add_argument("--level", type=int, choices=(8, 9), help="only this error level")
    errors.add_argument(
        "--code", default="", help="only this code (goqd's, or the mall's own, e.g. IE0003)"
    )
    errors.add_argument("--all", action="store_true", help="include cleared and resolved errors")
    errors.add_argument("--after", type=int, default=0, metavar="ID", help="the page after ID")
    errors.add_argument("--limit", type=int, default=500)
    errors_sub = errors.add_subparsers(dest="errors_command", metavar="clear")
    clear = add(errors_sub, "clear", "clear errors by id, or every open error of a store")
    clear.add_argument("ids", nargs="*", type=int, metavar="ID")
    clear.add_argument("--store", dest="clear_store", default="", help="every error of STORE")

    parked = add(
        cmds,
        "parked",
        "parked order lines (連携できない商品): sales that lower no other store yet",
    )
    parked.add_argument("--store", default="", help="only this store")
    parked.add_argument(
        "--after",
        nargs=3,
        default=("", "", ""),
        metavar=("STORE", "ORDER", "LINE"),
        help="the page after this line",
    )
    parked.add_argument("--limit", type=int, default=500)

    key = add(cmds, "key", "credentials")
    key_sub = key.add_subparsers(dest="key_command", metavar="set", required=True)
    key_set = add(
        key_sub,
        "set",
        "renew a store's credential: tested against the mall, stored 0600, store resumed",
    )
    key_set.add_argument("store", metavar="STORE")
    key_set.add_argument(
        "--file",
        metavar="F",
        help="JSON object of credential fields (default: stdin; typed input is hidden)",
    )

    for name, help_ in (
        ("pause", "stop polling and pushing for a store"),
        ("resume", "resume a paused or stopped store"),
        ("poll-now", "poll a store's orders now"),
        ("listings", "a store's listings and their links"),
        ("diff", "差異商品: listings whose mall count differs from goqd's"),
    ):
        sp = add(cmds, name, help_)
        sp.add_argument("store", metavar="STORE")
        if name == "listings":
            _paging(sp)

    products = add(cmds, "products", "products (商品) with their total stock")
    _paging(products)

    link = add(
        cmds,
        "link",
        "紐づけ: link a listing to a product",
        usage="goqctl link STORE LISTING SKU\n       goqctl link --auto [STORE]",
    )
    link.add_argument("args", nargs="*", metavar="ARG")
    link.add_argument(
        "--auto", action="store_true", help="link what the link condition now matches"
    )

    unlink = add(cmds, "unlink", "unlink a listing from its product")
    unlink.add_argument("store", metavar="STORE")
    unlink.add_argument("listing", metavar="LISTING")

    stock = add(cmds, "stock", "総在庫数: set, adjust or import product totals")
    stock_sub = stock.add_subparsers(dest="stock_command", metavar="set|adjust|import")
    stock_sub.required = True
    st_set = add(stock_sub, "set", "set a product's total")
    st_set.add_argument("sku", metavar="SKU")
    st_set.add_argument("quantity", type=int, metavar="N")
    st_set.add_argument("--reason", default="")
    st_adj = add(stock_sub, "adjust", "add to (or, with -N, take from) a product's total")
    st_adj.add_argument("sku", metavar="SKU")
    st_adj.add_argument("delta", type=int, metavar="±N")
    st_adj.add_argument("--reason", default="")
    st_imp = add(stock_sub, "import", "set or adjust totals from a CSV (UTF-8 or Shift_JIS)")
    st_imp.add_argument("file", metavar="FILE")

    history = add(cmds, "history", "a product's total and its latest movements")
    history.add_argument("sku", metavar="SKU")
    history.add_argument("--limit", type=int, default=50)

    listing = add(cmds, "listing", "listing attributes")
    listing_sub = listing.add_subparsers(dest="listing_command", metavar="set", required=True)
    ls_set = add(listing_sub, "set", "change a listing's push attributes")
    ls_set.add_argument("store", metavar="STORE")
    ls_set.add_argument("listing", metavar="LISTING")
    ls_set.add_argument("--lead-time", type=int, metavar="N", help="days (Amazon)")
    ls_set.add_argument("--restock-date", metavar="YYYY-MM-DD", help="入荷予定日 (Amazon)")
    ls_set.add_argument(
        "--allow-overdraft", choices=("yes", "no"), help="超過購入 (Yahoo!ショッピング)"
    )

    delete = add(cmds, "delete", "stop syncing a product (nothing is deleted at any mall)")
    delete.add_argument("sku", metavar="SKU")

    imp = add(cmds, "import", "import a store's listings from its mall, or from a CSV")
    imp.add_argument("store", metavar="STORE")
    imp.add_argument("--csv", metavar="FILE", help="goqd CSV (UTF-8 or Shift_JIS)")

    reflect = add(
        cmds,
        "reflect",
        "反映: push goqd's counts to a store",
        usage="goqctl reflect STORE (LISTING ...|--all)",
    )
    reflect.add_argument("store", metavar="STORE")
    reflect.add_argument("listings", nargs="*", metavar="LISTING")
    reflect.add_argument("--all", action="store_true", help="every linked listing of the store")
    return parser


def _paging(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--after", default="", metavar="KEY", help="start after this key")
    sp.add_argument("--limit", type=int, default=500)


def _request_from(args: argparse.Namespace) -> p.ControlRequest:
    sp: argparse.ArgumentParser = args._parser
    cmd = args.command
    if cmd == "status":
        return p.Status()
    if cmd == "stores":
        return p.Stores()
    if cmd == "errors":
        if args.errors_command == "clear":
            if bool(args.ids) == bool(args.clear_store):
                raise _Usage(sp, "give error IDs or --store STORE (not both)")
            return p.ErrorsClear(ids=tuple(args.ids), store=args.clear_store)
        return p.Errors(
            store=args.store,
            include_cleared=args.all,
            level=args.level,
            code=args.code,
            after=args.after,
            limit=args.limit,
        )
    if cmd == "parked":
        return p.Parked(store=args.store, after=tuple(args.after), limit=args.limit)
    if cmd == "key":
        return p.KeySet(store=args.store, credentials=_read_credentials(args.file, args.store))
    if cmd == "pause":
        return p.Pause(store=args.store)
    if cmd == "resume":
        return p.Resume(store=args.store)
    if cmd == "poll-now":
        return p.PollNow(store=args.store)
    if cmd == "products":
        return p.Products(after=args.after, limit=args.limit)
    if cmd == "listings":
        return p.Listings(store=args.store, after=args.after, limit=args.limit)
    if cmd == "link":
        if args.auto:
            if len(args.args) > 1:
                raise _Usage(sp, "link --auto takes at most one STORE")
            return p.LinkAuto(store=args.args[0] if args.args else "")
        if len(args.args) != 3:
            raise _Usage(sp, "link needs STORE LISTING SKU (or --auto [STORE])")
        store, listing_key, sku = args.args
        return p.LinkListing(store=store, listing_key=listing_key, sku=sku)
    if cmd == "unlink":
        return p.UnlinkListing(store=args.store, listing_key=args.listing)
    if cmd == "stock":
        if args.stock_command == "set":
            return p.StockSet(sku=args.sku, quantity=args.quantity, reason=args.reason)
        if args.stock_command == "adjust":
            return p.StockAdjust(sku=args.sku, delta=args.delta, reason=args.reason)
        return p.StockImport(csv_text=_read_csv(args.file))
    if cmd == "history":
        return p.History(sku=args.sku, limit=args.limit)
    if cmd == "listing":
        if args.lead_time is None and args.restock_date is None and args.allow_overdraft is None:
            raise _Usage(sp, "give at least one of --lead-time, --restock-date, --allow-overdraft")
        overdraft = None if args.allow_overdraft is None else args.allow_overdraft == "yes"
        return p.ListingSet(
            store=args.store,
            listing_key=args.listing,
            lead_time_days=args.lead_time,
            restock_date=args.restock_date,
            allow_overdraft=overdraft,
        )
    if cmd == "delete":
        return p.DeleteProduct(sku=args.sku)
    if cmd == "import":
        csv_text = _read_csv(args.csv) if args.csv else None
        return p.Import(store=args.store, csv_text=csv_text)
    if cmd == "diff":
        return p.Diff(store=args.store)
    if cmd == "reflect":
        if bool(args.listings) == bool(args.all):
            raise _Usage(sp, "name the LISTINGs to push, or --all (not both)")
        return p.Reflect(store=args.store, listing_keys=tuple(args.listings))
    raise _Usage(sp, f"unknown command {cmd!r}")  # argparse's choices make this unreachable


def _read_credentials(file: str | None, store: str) -> dict[str, str]:
    """The credential as a JSON object of strings. Its content is never printed."""
    if file and file != "-":
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise _LocalError(f"cannot read {file}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        data = getpass.getpass(f"credential JSON for {store} (input hidden): ").encode()
    else:
        data = sys.stdin.buffer.read(MAX_CREDENTIAL_BYTES + 1)
    if len(data) > MAX_CREDENTIAL_BYTES:
        raise _LocalError("the credential is larger than 64 KiB; is this the right file?")
    try:
        creds = msgspec.json.decode(data, type=dict[str, str])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # msgspec's messages name a position or a path, never the content.
        raise _LocalError(
            f"the credential must be a JSON object of strings: {exc}",
            'e.g. {"service_secret": "…", "license_key": "…"} (the fields your mall needs)',
        ) from None
    if not creds:
        raise _LocalError("the credential JSON object is empty")
    return creds


def _read_csv(file: str) -> str:
    """A CSV as text: UTF-8 (with or without BOM) or Shift_JIS (cp932), as merchants'
    spreadsheet exports come; anything else is refused rather than mangled."""
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise _LocalError(f"cannot read {file}: {exc.strerror}") from None
    if b"\x00" in data:
        raise _LocalError(
            f"{file} contains NUL bytes: not a CSV text file",
            "export it from your spreadsheet as CSV (UTF-8 or Shift_JIS)",
        )
    # The daemon's own rules (goqd.csvio): EUC-JP is refused, never read as cp932.
    try:
        return decode_csv_bytes(data, where=file)
    except InputError as exc:
        raise _LocalError(str(exc)) from None


# --------------------------------------------------------------------------------------
# Human output
# --------------------------------------------------------------------------------------


def _now() -> float:
    return time.time()  # a seam for tests: ages and days-left are relative to now


def _render(result: p.ControlResult, request: p.ControlRequest, args: argparse.Namespace) -> str:
    now = _now()
    if isinstance(result, p.DaemonStatus):
        return _render_status(result, now)
    if isinstance(result, p.StoreList):
        return _render_stores(result.stores, now)
    if isinstance(result, m.ErrorList):
        return _render_errors(result, request)
    if isinstance(result, m.ParkedList):
        return _render_parked(result, request)
    if isinstance(result, m.Done):
        return _render_done(result, request)
    if isinstance(result, m.StockChanged):
        return (
            f"{result.sku}: total {result.total} ({result.delta:+d}), "
            f"movement #{result.movement_id}"
        )
    if isinstance(result, m.History):
        return _render_history(result)
    if isinstance(result, m.ProductList):
        return _render_products(result, getattr(request, "limit", 0))
    if isinstance(result, m.ListingList):
        return _render_listings(result, request)
    if isinstance(result, p.DiffReport):
        return _render_diff(result)
    if isinstance(result, m.LinkReport):
        return _render_import(result)
    if isinstance(result, m.LedgerStatus):
        return _render_ledger(result)
    return msgspec.json.encode(result).decode()


def _render_status(s: p.DaemonStatus, now: float) -> str:
    lines = [
        f"goqd {s.version}, up {_duration(s.uptime_s)} (since {_when(s.started_at)})",
        _render_ledger(s.ledger),
        "",
        _render_stores(s.stores, now),
    ]
    return "\n".join(lines)


def _render_ledger(led: m.LedgerStatus) -> str:
    return (
        f"ledger: {led.products} products, {led.listings} listings, "
        f"{led.order_lines} order lines; outbox {led.outbox}, parked {led.parked}, "
        f"oversold units {led.oversold_units}"
    )


def _store_note(s: p.StoreInfo, now: float) -> str:
    notes = []
    if s.message:
        notes.append(s.message)
    if s.state == "stopped":
        notes.append(f"→ goqctl key set {s.name}")
    elif s.state == "paused":
        notes.append(f"→ goqctl resume {s.name}")
    elif s.state == "down":
        notes.append("→ see `journalctl -u goqd`, then restart goqd")
    if s.key_warning and s.state != "stopped":
        notes.append(s.key_warning)
    if s.parked:
        notes.append(f"{s.parked} order line(s) parked → goqctl parked --store {s.name}")
    if s.ambiguous:
        notes.append(
            f"{s.ambiguous} listing(s) 複数の商品が紐づいています → "
            f"goqctl errors --store {s.name} --code multiple_links"
        )
    if s.held:
        notes.append(f"{s.held} unit(s) held: sold at the mall, order not fetched yet")
    return "; ".join(notes)


def _render_stores(stores: Sequence[p.StoreInfo], now: float) -> str:
    if not stores:
        return "no stores configured"
    rows = [
        [
            s.name,
            s.mall,
            s.state,
            str(s.error_level) if s.error_level else "-",
            _ago(s.last_poll_ok_at, now),
            _ago(s.last_push_ok_at, now),
            str(s.outbox),
            str(s.parked),
            _days_left(s.credential_expires_at, now),
            _store_note(s, now),
        ]
        for s in stores
    ]
    return _table(
        ["STORE", "MALL", "STATE", "LEVEL", "POLLED", "PUSHED", "OUTBOX", "PARKED", "KEY", "NOTE"],
        rows,
        right={3, 6, 7},
        clip={9: 80},
    )


def _render_errors(result: m.ErrorList, request: p.ControlRequest) -> str:
    include_cleared = getattr(request, "include_cleared", False)
    if not result.errors:
        if getattr(request, "after", 0):
            return "no more errors"
        return "no cleared or open errors" if include_cleared else "no open errors"
    rows = [
        [
            str(e.id),
            e.store,
            str(e.level),
            e.code + (f" ({e.mall_code})" if e.mall_code else ""),
            e.listing_key or "-",
            str(e.count),
            _when(e.last_seen),
            _error_state(e),
            e.message,
        ]
        for e in result.errors
    ]
    out = [
        _table(
            ["ID", "STORE", "LEVEL", "CODE", "LISTING", "COUNT", "LAST SEEN", "STATE", "MESSAGE"],
            rows,
            right={0, 2, 5},
            clip={8: 80},
        )
    ]
    stopped = sorted({e.store for e in result.errors if e.level >= 9 and e.cleared_at is None})
    for store in stopped:
        out.append(f"→ level 9 (credential) for {store}: goqctl key set {store}")
    if any(e.cleared_at is None for e in result.errors):
        out.append("→ after fixing the cause: goqctl errors clear ID ...")
    limit = getattr(request, "limit", 0)
    if limit and len(result.errors) >= limit:
        out.append(f"→ more: {_errors_command(request)} --after {result.errors[-1].id}")
    return "\n".join(out)


def _error_state(e: m.ErrorRecord) -> str:
    if e.cleared_at is None:
        return "open"
    # healed: the store recovered by itself; resolved: its cause was fixed (lines
    # booked, link made unambiguous, the listing accepted); cleared: by an operator.
    verb = {"healed": "healed", "resolved": "resolved"}.get(e.cleared_by, "cleared")
    return f"{verb} {_when(e.cleared_at)}"


def _errors_command(request: p.ControlRequest) -> str:
    """The `goqctl errors` command that asked for this page, without --after."""
    words = ["goqctl", "errors"]
    if isinstance(request, p.Errors):
        if request.store:
            words += ["--store", shlex.quote(request.store)]
        if request.level is not None:
            words += ["--level", str(request.level)]
        if request.code:
            words += ["--code", shlex.quote(request.code)]
        if request.include_cleared:
            words.append("--all")
        if request.limit != 500:
            words += ["--limit", str(request.limit)]
    return " ".join(words)


def _render_parked(pl: m.ParkedList, request: p.ControlRequest) -> str:
    if not pl.lines:
        paging = any(getattr(request, "after", ()))
        return "no more parked order lines" if paging else "no parked order lines"
    rows = [
        [
            x.store,
            x.order_id,
            x.line_id,
            x.listing_key,
            ("cancelled " if x.cancelled else "") + str(x.quantity),
            _when(x.parked_at),
            x.link_state,
            x.action,
        ]
        for x in pl.lines
    ]
    out = [
        f"{pl.total} order line(s) parked: these sales lower no other store until their "
        "listing is linked (連携できない商品)",
        _table(
            ["STORE", "ORDER", "LINE", "LISTING", "QTY", "SINCE", "LISTING IS", "TO BOOK THEM"],
            rows,
            right={4},
        ),
    ]
    limit = getattr(request, "limit", 0)
    if limit and len(pl.lines) >= limit:
        last = pl.lines[-1]
        where = f" --store {shlex.quote(last.store)}" if getattr(request, "store", "") else ""
        after = " ".join(shlex.quote(x) for x in (last.store, last.order_id, last.line_id))
        out.append(f"→ more: goqctl parked{where} --after {after}")
    return "\n".join(out)


def _render_done(d: m.Done, request: p.ControlRequest) -> str:
    text = d.detail or f"{p.request_tag(request).replace('_', ' ')}: {d.changed} changed"
    if d.released:
        text += f"; {d.released} parked order line(s) booked"
    for warning in d.warnings:
        text += f"\nwarning: {warning}"
    return text


def _render_history(h: m.History) -> str:
    head = f"{h.sku}: total {h.total}"
    if h.held:
        head += f", {h.held} held for sales a mall showed before its orders (shown: "
        head += f"{max(0, h.total - h.held)})"
    if not h.movements:
        return head + "\n(no movements)"
    rows = [
        [
            str(mv.id),
            _when(mv.at),
            mv.cause,
            f"{mv.delta:+d}",
            str(mv.total_after) + (f" ({mv.held_after} held)" if mv.held_after else ""),
            mv.store or "-",
            f"{mv.order_id}/{mv.line_id}" if mv.order_id else "-",
            (f"oversold {mv.oversold}; " if mv.oversold else "") + mv.reason,
        ]
        for mv in h.movements
    ]
    table = _table(
        ["ID", "WHEN", "CAUSE", "DELTA", "TOTAL", "STORE", "ORDER/LINE", "NOTE"],
        rows,
        right={0, 3, 4},
    )
    return f"{head}\n{table}"


def _render_products(pl: m.ProductList, limit: int) -> str:
    if not pl.products:
        return "no products"
    rows = [
        [
            x.sku,
            x.name,
            str(x.total) if x.count_known else "unknown",
            str(x.listings),
            x.first_store or "-",
        ]
        for x in pl.products
    ]
    headers = ["SKU", "NAME", "TOTAL", "LISTINGS", "FIRST STORE"]
    out = _table(headers, rows, right={2, 3}, clip={1: NAME_WIDTH})
    if limit and len(pl.products) >= limit:
        out += f"\n→ more: goqctl products --after {shlex.quote(pl.products[-1].sku)}"
    if any(not x.count_known for x in pl.products):
        out += "\n→ TOTAL unknown: not synced until you set it: goqctl stock set SKU N"
    return out


def _render_listings(ll: m.ListingList, request: p.ControlRequest) -> str:
    if not ll.listings:
        return "no listings"
    rows = [
        [
            x.listing_key,
            x.sku or "-",
            x.link_state,
            x.name,
            _opt(x.last_pushed_quantity),
            _opt(x.last_seen_quantity),
            "yes" if x.pending_version is not None else "-",
        ]
        for x in ll.listings
    ]
    out = _table(
        ["LISTING", "SKU", "LINK", "NAME", "PUSHED", "SEEN", "PENDING"],
        rows,
        right={4, 5},
        clip={3: NAME_WIDTH},
    )
    limit = getattr(request, "limit", 0)
    store = getattr(request, "store", "")
    if limit and len(ll.listings) >= limit:
        last = shlex.quote(ll.listings[-1].listing_key)
        out += f"\n→ more: goqctl listings {store} --after {last}"
    if any(x.link_state == "ambiguous" for x in ll.listings):
        out += (
            f"\n→ ambiguous links park their orders: goqctl unlink {store} LISTING, "
            f"then goqctl link {store} LISTING SKU"
        )
    return out


def _render_diff(d: p.DiffReport) -> str:
    head = f"{d.store}: {d.checked} linked listing(s) checked, {len(d.rows)} differ"
    if not d.rows:
        return head
    rows = [
        [r.listing_key, r.sku, str(r.ledger_quantity), _opt(r.mall_quantity, "unlimited")]
        for r in d.rows
    ]
    table = _table(["LISTING", "SKU", "GOQD", "MALL"], rows, right={2, 3})
    keys = " ".join(r.listing_key for r in d.rows[:20])
    return f"{head}\n{table}\n→ push goqd's counts: goqctl reflect {d.store} {keys}"


def _render_import(r: m.LinkReport) -> str:
    where = r.store or "every store"
    out = (
        f"{where}: {r.seen} listing(s) read, {r.created} product(s) created, "
        f"{r.new_listings} new listing(s), {r.updated} updated, {r.linked} linked, "
        f"{r.unlinked} unlinked, {r.ambiguous} ambiguous"
    )
    if r.released:
        out += f"\n{r.released} parked order line(s) booked"
    if r.count_unknown:
        out += (
            f"\n{r.count_unknown} product(s) created without a count (unlimited or not "
            "tracked at the mall): nothing is pushed for them until you set one"
        )
    for problem in r.problems[:20]:
        out += f"\n  {problem}"
    if r.unlinked:
        out += f"\n→ link them: goqctl link --auto {r.store}, or goqctl link {r.store} LISTING SKU"
    if r.ambiguous:
        out += f"\n→ ambiguous listings: goqctl listings {r.store}, then unlink the wrong one"
    if r.count_unknown:
        out += "\n→ give them a count: goqctl stock set SKU N (see goqctl products)"
    return out


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


def _cell_width(text: str) -> int:
    """Terminal columns: East Asian Wide/Fullwidth take two, combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _clean(text: str) -> str:
    # Names come from malls: a control character must not move the terminal's cursor.
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)


def _clip(text: str, width: int) -> str:
    if _cell_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = _cell_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: set[int] | frozenset[int] = frozenset(),
    clip: dict[int, int] | None = None,
) -> str:
    clip = clip or {}
    cells = [list(headers)] + [
        [_clip(_clean(c), clip[i]) if i in clip else _clean(c) for i, c in enumerate(row)]
        for row in rows
    ]
    widths = [max(_cell_width(r[i]) for r in cells) for i in range(len(headers))]
    last = len(headers) - 1
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - _cell_width(cell))
            if i in right:
                parts.append(pad + cell)
            elif i == last:
                parts.append(cell)  # no trailing spaces
            else:
                parts.append(cell + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _opt(value: int | None, none: str = "-") -> str:
    return none if value is None else str(value)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return "?"  # no calendar date (nan, 1e300): the reply is odd, the table still shows


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else _duration(now - ts) + " ago"


def _days_left(ts: float | None, now: float) -> str:
    if ts is not None and not math.isfinite(ts):
        return "?"
    days = expiry.days_left(ts, now)
    if days is None:
        return "-"
    return "expired" if days < 0 else f"{days}d"


if __name__ == "__main__":
    sys.exit(main())
