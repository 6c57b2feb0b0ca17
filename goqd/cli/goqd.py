"""``goqd``: run the daemon, check a config, run the demo or a benchmark.

Exit codes: 0 ok; 1 the daemon or check failed (bad config, refused ledger, demo not
converged); 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

import msgspec
import structlog
import trio

from goqd.errors import ConfigError, GoqdError

log = structlog.get_logger("goqd.cli")


# Subcommands that run a tool rather than the daemon. Their options are defined by the
# tool itself and their modules imported only once one of them is chosen: the tools
# import every simulator, and `goqd run` must load none of that.
_TOOLS: dict[str, tuple[str, str]] = {
    "demo": (
        "goqd.tools.demo",
        "simulated malls + a real daemon on a temporary ledger, on a fast clock",
    ),
    "sim": (
        "goqd.tools.simbench",
        "market benchmark: sync latency, oversold units, API budget vs a baseline",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goqd", description="Stock synchronisation across Japanese malls (在庫連携)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (under systemd: Type=notify)")
    run.add_argument("--config", "-c", default="/etc/goqd/goqd.toml")

    check = sub.add_parser("check-config", help="validate a config file and its credentials")
    check.add_argument("file")

    for name, (_, summary) in _TOOLS.items():
        # No options (not even --help) here: everything after the name goes to the
        # tool's own parser (``_tool_parser``).
        sub.add_parser(name, help=summary, add_help=False)

    bench = sub.add_parser("bench", help="benchmarks (print figures, assert nothing)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    led = bench_sub.add_parser("ledger", help="booking throughput: actor vs raw executemany")
    led.add_argument("--skus", type=int, default=100_000)
    led.add_argument("--lines", type=int, default=100_000)
    led.add_argument("--per-message", type=int, default=100)
    led.add_argument("--senders", type=int, default=8)
    led.add_argument("--json", action="store_true")
    return parser


def _tool_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``goqd <name>`` for a tool subcommand, its options defined by the
    tool's ``add_arguments``."""
    module_name, summary = _TOOLS[name]
    tool = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"goqd {name}", description=summary)
    tool.add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed; a tool subcommand's options by the tool's own parser."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in _TOOLS:
        tool_args = _tool_parser(args.command).parse_args(rest)
        tool_args.command = args.command
        return tool_args
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check-config":
            return _check(args.file)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "sim":
            from goqd.tools.simbench import run_sim_command

            return run_sim_command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI boundary: say what went wrong in one line
        known = _goqd_errors(exc)
        if not known:
            raise
        for error in known:
            prefix = "config error: " if isinstance(error, ConfigError) else ""
            print(f"goqd: {prefix}{_one_line(str(error))}", file=sys.stderr)
        return 1
    return 2


def _goqd_errors(exc: BaseException) -> list[GoqdError | OSError]:
    """The goqd errors (and OS errors such as a port in use) inside ``exc``.

    Errors raised during start-up reach us wrapped in trio's exception groups; an
    operator should see "goqd: <file>: not an SQLite database", not a traceback.
    Returns [] if anything else is in there (that is a bug: show the traceback).
    """
    if isinstance(exc, BaseExceptionGroup):
        found: list[GoqdError | OSError] = []
        for inner in exc.exceptions:
            sub = _goqd_errors(inner)
            if not sub:
                return []
            found += sub
        return found
    if isinstance(exc, (GoqdError, OSError)):
        return [exc]
    return []


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a key or a path in a config file may
    hold a newline, and a refusal is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check(file: str) -> int:
    """Refuse what ``goqd run`` would refuse, and change nothing.

    The config file, the host (control groups, state directory), every store's
    credential file (its values are never printed) and the ledger: an existing one is
    opened read-only and checked as ``run`` checks it (SQLite header, application id,
    schema version, quick_check, write access); a missing one is not created.
    """
    from goqd.config import check_host, load_config, load_credentials
    from goqd.errors import LedgerError
    from goqd.ledger.schema import open_db

    config = load_config(file)
    check_host(config)
    for store in config.stores:
        load_credentials(config, store)
    ledger = config.daemon.ledger_path
    if os.path.exists(ledger) and os.path.getsize(ledger) > 0:
        try:
            open_db(ledger, read_only=True).close()
        except LedgerError as exc:
            key = "$.daemon.ledger" if config.daemon.ledger else "$.daemon.state-dir"
            raise ConfigError(config.source, key, str(exc)) from None
        state = f"ledger {ledger} checked"
    else:
        state = f"ledger {ledger} will be created"
    print(f"{file}: ok ({len(config.stores)} stores), {state}")
    return 0


def _run(file: str) -> int:
    from goqd.app import run_daemon
    from goqd.config import load_config
    from goqd.logs import configure_logging

    # SIGHUP ends a process by default. The daemon listens for it only once its stores
    # exist, and trio hands a SIGHUP still pending when it stops listening (at shutdown)
    # back to this handler: one sent while goqd starts is noted here and reloads once the
    # daemon is ready (the file may have changed after it was read); one sent while goqd
    # stops does nothing.
    early: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: early.append(signum))
    try:
        config = load_config(file)
        fmt = config.daemon.log_format
        configure_logging(config.daemon.log_level, json=None if fmt == "auto" else fmt == "json")

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                daemon = await nursery.start(run_daemon, config)
                if early:
                    log.info("config_reload_requested", signal="SIGHUP", during="start-up")
                    nursery.start_soon(daemon.reload)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("daemon_stopping", signal=signal.Signals(signum).name)
                        break
                # Stop within the stop timeout: cancel everything; the ledger finishes
                # the batch it has on its thread (shielded) and closes the file.
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        signal.signal(signal.SIGHUP, previous)
    log.info("daemon_stopped")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from goqd.logs import configure_logging
    from goqd.tools.demo import demo_polls, demo_stores, format_summary, run_demo

    try:
        demo_polls(demo_stores(args.malls), args.poll_interval)
    except ValueError as exc:  # a usage error, refused before anything starts
        print(f"goqd demo: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    configure_logging("warning", json=False, stream=sys.stderr)
    summary = run_demo(
        seconds=args.seconds,
        seed=args.seed,
        order_rate=args.order_rate,
        poll_interval=args.poll_interval,
        speed=args.speed,
        live=not args.json,
        keep=args.keep,
        malls=args.malls,
    )
    if args.json:
        print(msgspec.json.encode(summary).decode())
    else:
        print(format_summary(summary))
    return 0 if summary.converged and summary.lost_lines == 0 else 1


def _bench(args: argparse.Namespace) -> int:
    from goqd.logs import configure_logging
    from goqd.tools.ledgerbench import bench_ledger, format_result

    configure_logging("warning", json=False, stream=sys.stderr)
    if args.bench == "ledger":
        result = bench_ledger(
            skus=args.skus, lines=args.lines, per_msg=args.per_message, senders=args.senders
        )
        print(format_result(result, as_json=args.json))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
