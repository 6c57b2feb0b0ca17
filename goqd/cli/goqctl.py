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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from goqd import expiry
from goqd import messages as m
from goqd.cli import csvout, progress
from goqd.control import protocol as p
from goqd.control.client import DaemonUnreachable, RemoteError, call_sync, new_request_id
from goqd.csvio import decode_csv_bytes
from goqd.errors import LEVEL_CREDENTIAL, LEVEL_TEMPORARY, ControlError, InputError

DEFAULT_SOCKET = "/run/goqd/control.sock"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
# Work that reads or writes a whole catalogue at the mall's rate limit takes minutes.
LONG_TIMEOUT = 3600.0
# Requests that report progress give up after this long without progress from the daemon
# (not after this long in all: a 100,000-listing diff at a mall's pace takes longer).
PROGRESS_IDLE_TIMEOUT = 600.0
DEFAULT_TIMEOUT = 30.0
KEY_TIMEOUT = 120.0  # key set tests the credential against the mall first
MAX_CREDENTIAL_BYTES = 64 * 1024
NAME_WIDTH = 40  # display cells for product/listing names and messages in tables
DEFAULT_PAGE = 500  # rows a table shows at once
CSV_PAGE = 5000  # rows a --csv asks the daemon for at once (its cap is 10,000)


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
    except KeyboardInterrupt:
        # Ctrl-C outside a request (reading a large CSV, printing a table): nothing was
        # sent, or the reply had come. _main handles it during a request, with a hint.
        print("goqctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
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
    # One id per invocation (or the one given): call() reuses it when it resends after
    # a broken connection, so a mutating request is applied at most once.
    args.rid = args.request_id or new_request_id()
    csv_out: str | None = getattr(args, "csv_out", None)
    try:
        if csv_out is not None:
            return _write_csv(args, request, timeout)
        result = _call(args, request, timeout)
    except KeyboardInterrupt:
        message = "interrupted"
        if csv_out is not None:
            # CsvOut removed its temporary file on the way out: FILE is as it was.
            where = "standard output" if csv_out == "-" else csv_out
            message += f": nothing was written to {where}"
        _report(args, "interrupted", message, _follow_hint(args, request, args_in))
        return EXIT_INTERRUPTED
    except DaemonUnreachable as exc:
        hint = exc.hint
        if exc.sent and p.is_mutating(request):
            hint = _follow_hint(args, request, args_in)
        _report(args, "unreachable", str(exc), hint)
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


def _reports_progress(request: p.ControlRequest) -> bool:
    return isinstance(request, p.Import | p.Diff | p.Reflect | p.StockImport)


def _call(args: argparse.Namespace, request: p.ControlRequest, timeout: float) -> p.ControlResult:
    """Send the request; a long one with its progress shown on stderr as it comes."""
    if not _reports_progress(request):
        return call_sync(args.socket, request, timeout=timeout, request_id=args.rid)
    with progress.shown_on(sys.stderr) as show:
        return call_sync(
            args.socket, request, timeout=timeout, request_id=args.rid, on_progress=show
        )


def _follow_hint(args: argparse.Namespace, request: p.ControlRequest, argv: list[str]) -> str:
    """What to do after goqctl stopped waiting (Ctrl-C, a lost connection, a timeout)."""
    if not p.is_mutating(request) and _reports_progress(request):
        return "the daemon finishes the diff on its own; run `goqctl diff` again for a report"
    if not p.is_mutating(request):
        return ""
    if "--request-id" not in argv:
        argv = ["--request-id", args.rid, *argv]
    again = shlex.join(["goqctl", *argv])
    if isinstance(request, p.Import):
        # The daemon keeps a listing import's outcome in memory only (the last few):
        # after a restart the same id finds nothing and imports again.
        return (
            "the daemon goes on with it (stopping goqctl does not stop it); to wait for it "
            "again and get its result (if goqd restarted since, this imports again, which "
            f"updates listings and never duplicates them): {again}"
        )
    if _reports_progress(request):
        return (
            "the daemon goes on with it (stopping goqctl does not stop it); to wait for it "
            f"again and get its result, not run it twice: {again}"
        )
    return (
        "the request may or may not have been applied; sending it again with its id "
        f"applies it at most once: {again}"
    )


def _timeout_for(request: p.ControlRequest) -> float:
    if _reports_progress(request):
        return PROGRESS_IDLE_TIMEOUT
    if isinstance(request, p.LinkAuto):
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
    common.add_argument("--request-id", default=argparse.SUPPRESS, metavar="ID", type=_request_id)

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
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up after this long (import, diff, reflect and stock import: after this "
        f"long without progress; default {PROGRESS_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--request-id",
        default=None,
        metavar="ID",
        type=_request_id,
        help="the request's id (default: a new one). import, reflect and stock import go "
        "on in the daemon when goqctl is stopped (Ctrl-C) or loses the daemon; sent again "
        "with the id goqctl printed then, the same command waits for that run and gets "
        "its result instead of running again",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for words, help_, positionals in _COMMANDS:
        name, _, sub = words.partition(" ")
        where = top
        if sub:
            if name not in groups:
                group_help, metavar = _GROUPS[name]
                group = _add_command(top, name, group_help, common)
                groups[name] = group.add_subparsers(
                    dest=f"{name}_command", metavar=metavar, required=True
                )
            where = groups[name]
        sp = _add_command(where, sub or name, help_, common, usage=_USAGE.get(words))
        for dest in positionals.split():
            metavar, type_ = _POSITIONALS[dest]
            sp.add_argument(dest, metavar=metavar, type=type_)
        options = _OPTIONS.get(words)
        if options is not None:
            options(sp, common)
    return parser


def _add_command(
    where: Any,
    name: str,
    help_: str,
    common: argparse.ArgumentParser,
    *,
    usage: str | None = None,
) -> argparse.ArgumentParser:
    sp: argparse.ArgumentParser = where.add_parser(
        name, help=help_, description=help_, parents=[common], usage=usage
    )
    sp.set_defaults(_parser=sp)
    return sp


# Every command: its words, its help, and its positional arguments (``_POSITIONALS``),
# in the order `goqctl --help` lists them. Its options are added by ``_OPTIONS``.
_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("status", "daemon, stores and ledger at a glance", ""),
    ("stores", "every store's state, error level, last poll and push, key expiry", ""),
    ("errors", "open errors (エラー), highest level first, then newest", ""),
    ("parked", "parked order lines (連携できない商品): sales that lower no other store yet", ""),
    (
        "key set",
        "renew a store's credential: tested against the mall, stored 0600, store resumed",
        "store",
    ),
    ("pause", "stop polling and pushing for a store", "store"),
    ("resume", "resume a paused or stopped store", "store"),
    ("poll-now", "poll a store's orders now", "store"),
    ("listings", "a store's listings and their links", "store"),
    ("diff", "差異商品: listings whose mall count differs from goqd's", "store"),
    ("products", "products (商品) with their total stock", ""),
    ("link", "紐づけ: link a listing to a product", ""),
    ("unlink", "unlink a listing from its product", "store listing"),
    ("stock set", "set a product's total", "sku quantity"),
    ("stock adjust", "add to (or, with -N, take from) a product's total", "sku delta"),
    ("stock import", "set or adjust totals from a CSV (UTF-8 or Shift_JIS)", "file"),
    ("stock list", "棚卸: every product's total, held and shown count", ""),
    ("history", "a product's total and its latest movements", "sku"),
    ("listing set", "change a listing's push attributes", "store listing"),
    ("delete", "stop syncing a product (nothing is deleted at any mall)", "sku"),
    ("import", "import a store's listings from its mall, or from a CSV", "store"),
    (
        "product add",
        "create a product with its 総在庫数 and link the listings of every store that the "
        "link condition matches to it (an existing SKU is refused)",
        "sku",
    ),
    ("reflect", "反映: push goqd's counts to a store", "store"),
)
# Commands with subcommands: their help and the subcommands' metavar.
_GROUPS = {
    "key": ("credentials", "set"),
    "stock": ("総在庫数: set, adjust or import product totals", "set|adjust|import|list"),
    "listing": ("listing attributes", "set"),
    "product": ("register products by hand", "add"),
}
_POSITIONALS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "store": ("STORE", str),
    "listing": ("LISTING", str),
    "sku": ("SKU", str),
    "quantity": ("N", int),
    "delta": ("±N", int),
    "file": ("FILE", str),
}
_USAGE = {
    "errors": "goqctl errors [--store S] [--level 8|9] [--code C] [--all] [--after ID] "
    "[--limit N]\n       goqctl errors clear (ID ...|--store S)",
    "link": "goqctl link STORE LISTING SKU\n       goqctl link --auto [STORE]",
    "reflect": "goqctl reflect STORE (LISTING ...|--all|--differing)",
}


def _errors_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--store", default="", help="only this store")
    sp.add_argument(
        "--level",
        type=int,
        choices=(LEVEL_TEMPORARY, LEVEL_CREDENTIAL),
        help="only this error level",
    )
    sp.add_argument(
        "--code", default="", help="only this code (goqd's, or the mall's own, e.g. IE0003)"
    )
    sp.add_argument("--all", action="store_true", help="include cleared and resolved errors")
    sp.add_argument("--after", type=int, default=0, metavar="ID", help="the page after ID")
    sp.add_argument("--limit", type=int, default=500)
    sub = sp.add_subparsers(dest="errors_command", metavar="clear")
    clear = _add_command(sub, "clear", "clear errors by id, or every open error of a store", common)
    clear.add_argument("ids", nargs="*", type=int, metavar="ID")
    clear.add_argument("--store", dest="clear_store", default="", help="every error of STORE")


def _parked_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--store", default="", help="only this store")
    sp.add_argument(
        "--after",
        nargs=3,
        default=("", "", ""),
        metavar=("STORE", "ORDER", "LINE"),
        help="the page after this line",
    )
    sp.add_argument("--limit", type=int, default=500)


def _key_set_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--file",
        metavar="F",
        help="JSON object of credential fields (default: stdin; typed input is hidden)",
    )


def _link_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("args", nargs="*", metavar="ARG")
    sp.add_argument("--auto", action="store_true", help="link what the link condition now matches")


def _reason_option(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--reason", default="")


def _history_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--limit", type=int, default=50)


def _listing_set_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--lead-time", type=int, metavar="N", help="days (Amazon)")
    sp.add_argument("--restock-date", metavar="YYYY-MM-DD", help="入荷予定日 (Amazon)")
    sp.add_argument(
        "--allow-overdraft", choices=("yes", "no"), help="超過購入 (Yahoo!ショッピング)"
    )


def _import_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--csv", metavar="FILE", help="goqd CSV (UTF-8 or Shift_JIS)")
    sp.add_argument(
        "--create-products",
        action="store_true",
        help="create a product (SKU: the listing's link code; 総在庫数: the mall's count) "
        "for each listing no product matches, and link it; the base store's import "
        "always does this, so there the flag changes nothing",
    )


def _product_add_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("--quantity", type=int, required=True, metavar="N", help="総在庫数")
    sp.add_argument("--name", default="", help="商品名")


def _reflect_options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sp.add_argument("listings", nargs="*", metavar="LISTING")
    sp.add_argument("--all", action="store_true", help="every linked listing of the store")
    sp.add_argument(
        "--differing",
        action="store_true",
        help="the listings the store's last `goqctl diff` found 差異 or with attributes "
        "changed at the mall (their counts and attributes are pushed)",
    )


def _table_options(*parts: Callable[[argparse.ArgumentParser], None]) -> _Options:
    def options(sp: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
        for part in parts:
            part(sp)

    return options


def _request_id(text: str) -> str:
    if not 1 <= len(text) <= 128 or not all("!" <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError(
            "a request id is 1 to 128 visible ASCII characters (as goqctl printed it)"
        )
    return text


def _paging(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--after", default="", metavar="KEY", help="start after this key")
    # None: not given (500 a page), so --csv, which writes every row, can refuse it.
    sp.add_argument("--limit", type=int, default=None, help="rows a page (default 500)")


def _listing_filters(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--state",
        choices=("linked", "unlinked", "ambiguous", "parked"),
        default="",
        help="only listings in this link state; parked: those with parked order lines",
    )
    sp.add_argument(
        "--search",
        default="",
        metavar="TEXT",
        help="only listings whose key, SKU, code or name contains TEXT",
    )


def _csv_options(sp: argparse.ArgumentParser) -> None:
    # dest csv_out: `import --csv FILE` is a file read, this one a file written.
    sp.add_argument(
        "--csv",
        dest="csv_out",
        metavar="FILE",
        help="write every row as CSV to FILE (- for stdout), for Excel",
    )
    sp.add_argument(
        "--encoding",
        choices=csvout.ENCODINGS,
        default=None,
        help=f"of the --csv file: UTF-8 with BOM or Shift_JIS (default {csvout.DEFAULT_ENCODING})",
    )


_Options = Callable[[argparse.ArgumentParser, argparse.ArgumentParser], None]
# The options of each command that has any, by its words.
_OPTIONS: dict[str, _Options] = {
    "errors": _errors_options,
    "parked": _parked_options,
    "key set": _key_set_options,
    "listings": _table_options(_paging, _listing_filters, _csv_options),
    "diff": _table_options(_csv_options),
    "products": _table_options(_paging, _csv_options),
    "link": _link_options,
    "stock set": _reason_option,
    "stock adjust": _reason_option,
    "stock list": _table_options(_paging, _csv_options),
    "history": _history_options,
    "listing set": _listing_set_options,
    "import": _import_options,
    "product add": _product_add_options,
    "reflect": _reflect_options,
}


def _page_limit(args: argparse.Namespace) -> int:
    return DEFAULT_PAGE if args.limit is None else int(args.limit)


def _command(args: argparse.Namespace) -> str:
    """The command as words: ``stock set``, ``errors clear``, ``errors``, ``poll-now``."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def _errors_clear(args: argparse.Namespace) -> p.ControlRequest:
    if bool(args.ids) == bool(args.clear_store):
        raise _Usage(args._parser, "give error IDs or --store STORE (not both)")
    return m.ClearErrors(ids=tuple(args.ids), store=args.clear_store)


def _link(args: argparse.Namespace) -> p.ControlRequest:
    if args.auto:
        if len(args.args) > 1:
            raise _Usage(args._parser, "link --auto takes at most one STORE")
        return p.LinkAuto(store=args.args[0] if args.args else "")
    if len(args.args) != 3:
        raise _Usage(args._parser, "link needs STORE LISTING SKU (or --auto [STORE])")
    store, listing_key, sku = args.args
    return m.Link(store=store, listing_key=listing_key, sku=sku)


def _listing_set(args: argparse.Namespace) -> p.ControlRequest:
    if args.lead_time is None and args.restock_date is None and args.allow_overdraft is None:
        raise _Usage(
            args._parser, "give at least one of --lead-time, --restock-date, --allow-overdraft"
        )
    overdraft = None if args.allow_overdraft is None else args.allow_overdraft == "yes"
    return m.SetListingAttrs(
        store=args.store,
        listing_key=args.listing,
        lead_time_days=args.lead_time,
        restock_date=args.restock_date,
        allow_overdraft=overdraft,
    )


def _reflect(args: argparse.Namespace) -> p.ControlRequest:
    if [bool(args.listings), args.all, args.differing].count(True) != 1:
        raise _Usage(
            args._parser, "name the LISTINGs to push, or --all, or --differing (one of them)"
        )
    return p.Reflect(store=args.store, listing_keys=tuple(args.listings), differing=args.differing)


def _products(args: argparse.Namespace) -> p.ControlRequest:
    return m.ListProducts(after=args.after, limit=_page_limit(args))


# What each command sends, by ``_command``. A command's arguments are its parser's.
_REQUESTS: dict[str, Callable[[argparse.Namespace], p.ControlRequest]] = {
    "status": lambda a: p.Status(),
    "stores": lambda a: p.Stores(),
    "errors": lambda a: m.ListErrors(
        store=a.store,
        include_cleared=a.all,
        level=a.level,
        code=a.code,
        after=a.after,
        limit=a.limit,
    ),
    "errors clear": _errors_clear,
    "parked": lambda a: m.ListParked(store=a.store, after=tuple(a.after), limit=a.limit),
    "key set": lambda a: p.KeySet(store=a.store, credentials=_read_credentials(a.file, a.store)),
    "pause": lambda a: p.Pause(store=a.store),
    "resume": lambda a: p.Resume(store=a.store),
    "poll-now": lambda a: p.PollNow(store=a.store),
    "products": _products,
    "listings": lambda a: m.ListListings(
        store=a.store, after=a.after, limit=_page_limit(a), state=a.state, search=a.search
    ),
    "link": _link,
    "unlink": lambda a: m.Unlink(store=a.store, listing_key=a.listing),
    "stock set": lambda a: m.SetStock(sku=a.sku, quantity=a.quantity, reason=a.reason),
    "stock adjust": lambda a: m.AdjustStock(sku=a.sku, delta=a.delta, reason=a.reason),
    "stock import": lambda a: p.StockImport(csv_text=_read_csv(a.file)),
    "stock list": _products,
    "history": lambda a: m.GetHistory(sku=a.sku, limit=a.limit),
    "listing set": _listing_set,
    "delete": lambda a: m.DeleteProduct(sku=a.sku),
    "import": lambda a: p.Import(
        store=a.store,
        csv_text=_read_csv(a.csv) if a.csv else None,
        create_products=a.create_products,
    ),
    "product add": lambda a: p.ProductAdd(sku=a.sku, quantity=a.quantity, name=a.name),
    "diff": lambda a: p.Diff(store=a.store),
    "reflect": _reflect,
}
# Commands that can write their rows as CSV (--csv FILE).
_CSV_COMMANDS = frozenset({"products", "listings", "diff", "stock list"})


def _request_from(args: argparse.Namespace) -> p.ControlRequest:
    command = _command(args)
    if command in _CSV_COMMANDS:
        _check_csv_options(args)
    build = _REQUESTS.get(command)
    if build is None:  # argparse's choices make this unreachable
        raise _Usage(args._parser, f"unknown command {command!r}")
    return build(args)


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
# CSV output (--csv FILE): every row, paged from the daemon, written by goqctl
# --------------------------------------------------------------------------------------


def _check_csv_options(args: argparse.Namespace) -> None:
    sp: argparse.ArgumentParser = args._parser
    if args.csv_out is None:
        if args.encoding is not None:
            raise _Usage(sp, "--encoding is for the --csv file: give --csv FILE too")
        return
    if args.json:
        raise _Usage(sp, "--csv and --json both choose the output: give one of them")
    if getattr(args, "limit", None) is not None:
        raise _Usage(sp, "--csv writes every row: leave out --limit")
    if not args.csv_out:
        raise _Usage(sp, "--csv needs a file name (or - for standard output)")


_CSV_HEADERS = {
    "diff": ("store", "listing_key", "sku", "status", "goqd", "mall", "pending", "held", "attrs"),
    "products": ("sku", "name", "total", "held", "count_known", "listings", "first_store"),
    # 棚卸: quantity is the 総在庫数 (blank: no count yet), shown what the malls get.
    "stock": ("sku", "name", "quantity", "held", "shown"),
    "listings": (
        "store",
        "listing_key",
        "sku",
        "link_code",
        "link_state",
        "name",
        "pushed",
        "seen",
        "pending",
        "held",
        "parked",
        "lead_time_days",
        "restock_date",
        "allow_overdraft",
    ),
}


def _write_csv(args: argparse.Namespace, request: p.ControlRequest, timeout: float) -> int:
    """Page through every row the request names and write them to ``args.csv_out``.

    The file is created (as a temporary sibling) before the first request, so a path
    goqctl cannot write costs no daemon work, and it replaces FILE only when every page
    came and every row could be encoded: a failure anywhere leaves FILE as it was.
    """
    kind = "stock" if args.command == "stock" else args.command
    encoding = args.encoding or csvout.DEFAULT_ENCODING
    # The daemon's errors and Ctrl-C go up to _main, like any request's, after the
    # ``with`` has removed the temporary file.
    try:
        with csvout.CsvOut(args.csv_out, encoding, _CSV_HEADERS[kind]) as out:
            for result in _csv_pages(args, request, timeout):
                out.write(_csv_rows(kind, result))
            out.commit()
    except csvout.CsvError as exc:
        _report(args, "local", exc.message, exc.hint)
        return EXIT_ERROR
    summary = f"{out.rows} row(s) written to {out.where} ({encoding})"
    if isinstance(request, p.Diff):
        summary += f"; → the 差異 rows: goqctl reflect {shlex.quote(request.store)} --differing"
    # On stdout the CSV itself is the output: the summary goes beside it, not into it.
    print(summary, file=sys.stderr if args.csv_out == "-" else sys.stdout)
    return EXIT_OK


def _csv_pages(
    args: argparse.Namespace, request: p.ControlRequest, timeout: float
) -> Iterable[p.ControlResult]:
    if isinstance(request, p.Diff):
        yield _call(args, request, timeout)
        return
    if not isinstance(request, m.ListProducts | m.ListListings):
        return  # the parser offers --csv on diff, products, listings and stock list only
    page: m.ListProducts | m.ListListings = msgspec.structs.replace(request, limit=CSV_PAGE)
    while True:
        result = call_sync(args.socket, page, timeout=timeout, request_id=new_request_id())
        yield result
        if isinstance(result, m.ProductList):
            if len(result.products) < page.limit:
                return
            page = msgspec.structs.replace(page, after=result.products[-1].sku)
        elif isinstance(result, m.ListingList):
            if len(result.listings) < page.limit:
                return
            page = msgspec.structs.replace(page, after=result.listings[-1].listing_key)
        else:
            return


def _csv_rows(kind: str, result: p.ControlResult) -> Iterable[Sequence[str]]:
    if isinstance(result, p.DiffReport):
        for d in result.rows:
            yield (
                result.store,
                d.listing_key,
                d.sku,
                d.status,
                str(d.ledger_quantity),
                _opt(d.mall_quantity, "unlimited"),
                _opt(d.pending_quantity, ""),
                str(d.held),
                _attrs_text(d.attrs_differ),
            )
    elif isinstance(result, m.ProductList) and kind == "stock":
        for x in result.products:
            known = x.count_known
            yield (
                x.sku,
                x.name,
                str(x.total) if known else "",
                str(x.held),
                str(max(0, x.total - x.held)) if known else "",
            )
    elif isinstance(result, m.ProductList):
        for x in result.products:
            yield (
                x.sku,
                x.name,
                str(x.total) if x.count_known else "",
                str(x.held),
                "yes" if x.count_known else "no",
                str(x.listings),
                x.first_store,
            )
    elif isinstance(result, m.ListingList):
        for li in result.listings:
            a = li.attrs
            yield (
                li.store,
                li.listing_key,
                li.sku or "",
                li.link_code,
                li.link_state,
                li.name,
                _opt(li.last_pushed_quantity, ""),
                _opt(li.last_seen_quantity, ""),
                _opt(li.pending_quantity, ""),
                str(li.held),
                str(li.parked),
                _opt(a.lead_time_days, ""),
                a.restock_date or "",
                _yes_no(a.allow_overdraft, ""),
            )


def _yes_no(value: bool | None, none: str = "-") -> str:
    return none if value is None else "yes" if value else "no"


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
        stock = getattr(args, "command", "") == "stock"
        return _render_products(result, getattr(request, "limit", 0), stock=stock)
    if isinstance(result, m.ListingList):
        return _render_listings(result, request)
    if isinstance(result, p.DiffReport):
        return _render_diff(result)
    if isinstance(result, m.LinkReport):
        return _render_import(result)
    if isinstance(result, m.ProductAdded):
        given = request.quantity if isinstance(request, p.ProductAdd) else None
        return _render_product_added(result, given)
    if isinstance(result, m.LedgerStatus):
        return _render_ledger(result)
    return msgspec.json.encode(result).decode()


def _render_status(s: p.DaemonStatus, now: float) -> str:
    lines = [
        f"goqd {s.version}, up {_duration(s.uptime_s)} (since {_when(s.started_at)})",
        _render_ledger(s.ledger),
    ]
    if s.reload_error:
        lines.append(f"last reload refused, running as before: {s.reload_error}")
    if s.restart_needed:
        lines.append(
            "changed in the config, applied only when goqd is restarted: "
            + ", ".join(s.restart_needed)
        )
    lines += ["", _render_stores(s.stores, now)]
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
    stopped = sorted(
        {e.store for e in result.errors if e.level >= LEVEL_CREDENTIAL and e.cleared_at is None}
    )
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
    if isinstance(request, m.ListErrors):
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


def _render_products(pl: m.ProductList, limit: int, *, stock: bool = False) -> str:
    """`goqctl products`, or with ``stock`` the 棚卸 of `goqctl stock list`: what goqd
    counts for each product, what it holds back and what it shows."""
    if not pl.products:
        return "no products"
    rows = []
    for x in pl.products:
        known = x.count_known
        total = str(x.total) if known else "unknown"
        if stock:
            shown = str(max(0, x.total - x.held)) if known else "-"
            rows.append([x.sku, x.name, total, str(x.held) if x.held else "-", shown])
        else:
            rows.append([x.sku, x.name, total, str(x.listings), x.first_store or "-"])
    if stock:
        headers, right, command = ["SKU", "NAME", "TOTAL", "HELD", "SHOWN"], {2, 3, 4}, "stock list"
    else:
        headers, right = ["SKU", "NAME", "TOTAL", "LISTINGS", "FIRST STORE"], {2, 3}
        command = "products"
    out = _table(headers, rows, right=right, clip={1: NAME_WIDTH})
    if limit and len(pl.products) >= limit:
        out += f"\n→ more: goqctl {command} --after {shlex.quote(pl.products[-1].sku)}"
    if stock and any(x.held for x in pl.products):
        out += "\n→ HELD: sales a mall showed before its order came; SHOWN is what the malls get"
    if any(not x.count_known for x in pl.products):
        out += "\n→ TOTAL unknown: not synced until you set it: goqctl stock set SKU N"
    return out


def _render_listings(ll: m.ListingList, request: p.ControlRequest) -> str:
    state = getattr(request, "state", "")
    search = getattr(request, "search", "")
    if not ll.listings:
        if getattr(request, "after", ""):
            return "no more listings"
        return "no listings match" if state or search else "no listings"
    rows = [
        [
            x.listing_key,
            x.sku or "-",
            x.link_state,
            x.name,
            _opt(x.last_pushed_quantity),
            _opt(x.last_seen_quantity),
            _opt(x.pending_quantity),
            str(x.parked) if x.parked else "-",
            _opt(x.attrs.lead_time_days),
            x.attrs.restock_date or "-",
            _yes_no(x.attrs.allow_overdraft),
        ]
        for x in ll.listings
    ]
    out = _table(
        [
            "LISTING",
            "SKU",
            "LINK",
            "NAME",
            "PUSHED",
            "SEEN",
            "PENDING",
            "PARKED",
            "LEAD TIME",
            "RESTOCK",
            "超過購入",
        ],
        rows,
        right={4, 5, 6, 7, 8},
        clip={3: NAME_WIDTH},
    )
    limit = getattr(request, "limit", 0)
    store = shlex.quote(getattr(request, "store", ""))
    if limit and len(ll.listings) >= limit:
        words = ["goqctl", "listings", store]
        if state:
            words += ["--state", state]
        if search:
            words += ["--search", shlex.quote(search)]
        if limit != DEFAULT_PAGE:
            words += ["--limit", str(limit)]
        last = shlex.quote(ll.listings[-1].listing_key)
        out += f"\n→ more: {' '.join(words)} --after {last}"
    if any(x.link_state == "ambiguous" for x in ll.listings):
        out += (
            f"\n→ ambiguous links park their orders: goqctl unlink {store} LISTING, "
            f"then goqctl link {store} LISTING SKU"
        )
    if any(x.parked for x in ll.listings):
        out += f"\n→ PARKED order lines lower no other store yet: goqctl parked --store {store}"
    return out


_DIFF_STATUS = {
    "differs": "差異",
    "attrs": "attributes differ",
    "pending": "push pending",
    "held": "held",
    "no_count": "no count",
}


def _render_diff(d: p.DiffReport) -> str:
    counts = {status: 0 for status in _DIFF_STATUS}
    for r in d.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    head = f"{d.store}: {d.checked} linked listing(s) checked, {counts['differs']} 差異"
    others = [f"{n} {_DIFF_STATUS[k]}" for k, n in counts.items() if n and k != "differs"]
    if others:
        head += f" (not 差異: {', '.join(others)})"
    if not d.rows:
        return head
    rows = [
        [
            r.listing_key,
            r.sku,
            str(r.ledger_quantity),
            _opt(r.mall_quantity, "unlimited"),
            str(r.held) if r.held else "-",
            _opt(r.pending_quantity),
            _DIFF_STATUS.get(r.status, r.status),
        ]
        for r in d.rows
    ]
    headers = ["LISTING", "SKU", "GOQD", "MALL", "HELD", "PUSHING", "STATUS"]
    # Only where a mall attribute differs: most malls have none to show.
    if any(r.attrs_differ for r in d.rows):
        headers.append("ATTRS (goqd→mall)")
        for row, r in zip(rows, d.rows, strict=True):
            row.append(_attrs_text(r.attrs_differ) or "-")
    out = [head, _table(headers, rows, right={2, 3, 4, 5})]
    store = shlex.quote(d.store)
    if counts["differs"] or counts["attrs"]:
        out.append(
            "→ push goqd's counts and attributes to the 差異 and attributes-differ listings: "
            f"goqctl reflect {store} --differing"
        )
    if any(r.attrs_differ for r in d.rows):
        out.append(
            "→ attributes: changed at the mall (lead time, restock date, 超過購入); "
            "goqd's next push of the listing overwrites them"
        )
    if counts["pending"]:
        out.append(
            "→ push pending: goqd was pushing these while the mall was read; "
            f"run goqctl diff {store} again once `goqctl stores` shows the outbox empty"
        )
    if counts["held"]:
        out.append(
            "→ held: within the units goqd holds for sales a mall showed before their "
            "orders came; they settle when the orders are booked"
        )
    if counts["no_count"]:
        out.append("→ no count: nothing is pushed until you set one: goqctl stock set SKU N")
    return "\n".join(out)


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


def _render_product_added(r: m.ProductAdded, given: int | None = None) -> str:
    sku = shlex.quote(r.sku)
    out = f"product {r.sku} created: total {r.total}"
    if given is not None and given != r.total:
        # Parked sales of the listings it now links are booked off the count given.
        out += f" (the {given} given, less {given - r.total} sold while unlinked)"
    if r.linked:
        shown = ", ".join(f"{store}/{key}" for store, key in r.linked[:20])
        more = f" and {len(r.linked) - 20} more" if len(r.linked) > 20 else ""
        out += f"\nlinked {len(r.linked)} listing(s): {shown}{more} (their counts are pushed)"
    else:
        out += (
            "\nno listing matched it: a store's listing is linked at its next import "
            f"(goqctl import STORE), or by hand: goqctl link STORE LISTING {sku}"
        )
    if r.released:
        out += f"\n{r.released} parked order line(s) booked"
    if r.ambiguous:
        shown = ", ".join(f"{store}/{key}" for store, key in r.ambiguous[:20])
        out += f"\n{len(r.ambiguous)} listing(s) ambiguous (複数の商品が紐づいています): {shown}"
    for problem in r.problems[:20]:
        out += f"\n  {problem}"
    if r.ambiguous:
        out += (
            "\n→ their orders park until one listing per store is left: unlink the wrong "
            "one (goqctl unlink STORE LISTING; goqctl errors --code multiple_links)"
        )
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


def _attrs_text(attrs: Sequence[p.AttrDiff]) -> str:
    """``lead_time 3→7 allow_overdraft off→on``: goqd's value, then the mall's."""

    def value(v: int | str | bool) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else str(v)

    return " ".join(f"{a.name} {value(a.ledger)}→{value(a.mall)}" for a in attrs)


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
