"""The invariant checker of the reliability harness: the invariants of
docs/reliability.md, section "Invariants, checked after every scenario" (I1–I6 are
their numbers there, and the names ``check`` takes and reports).

Jepsen's shape: the simulated malls are the system's environment and record what
happened there (their orders, every absolute value goqd set per listing, every request);
the ledger file records what goqd believes. After a scenario, ``check`` reads both and
lists every violation of

* **I1 no loss** — every line a mall holds has exactly one booking whose ``booked_qty``
  is the mall's latest quantity (0 if cancelled) or a parked row, no booking is a
  phantom, and the booking's movements add up to it (nothing booked twice);
* **I2 conservation** — per SKU ``total = initial + Σ operator changes − Σ booked_qty``,
  the movements add up to the total and chain (``total_after`` follows ``delta``);
* **I3 convergence** — every linked listing's count at its mall is ``max(0, total)`` and
  nothing is left in the outbox;
* **I4 no stale overwrite** — the values goqd set on a listing, in the order the mall
  applied them, are the counts of ledger movements in non-decreasing movement order, each
  no newer than the moment the mall applied it (see ``_match_history``);
* **I5 isolation** — from ``propagation_delays``: how long after a ledger change a healthy
  store showed it; the caller gives the bound;
* **I6 visibility** — every fault episode that hit the daemon shows in a metric, in the
  errors table, and (when a state log is given) in the store's state.

What it must never do: write to the ledger (the file is opened read-only) or change a
simulator. It reads only ``SimMall`` state, so it works the same for every mall.

Versions are not observable at a mall (malls store a count, not goqd's version), so I4
is checked on the one thing that is: the sequence of counts. Each count pushed is
``max(0, total_after)`` of some movement of the SKU; a value that matches no movement at
or after the previous one — and no later than when it was applied — is a stale write.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from goqd.errors import LEVEL_CREDENTIAL, LEVEL_TEMPORARY
from goqd.ledger import queries
from goqd.sim.base import SimMall

# Operator movements (the "operator adjustments" of conservation, I2); "import" is the
# initial stock.
OPERATOR_CAUSES = frozenset({"set", "adjust"})
ORDER_CAUSES = frozenset({"order", "cancel", "correction"})
# The sale watch's holds: the total does not move, the count pushed does.
HOLD_CAUSES = frozenset({"hold"})

# Which metric outcomes (``goqd_polls_total`` / ``goqd_mall_requests_total``) and which
# error level show a fault of each kind (tests.helpers.faults.FaultKind).
FAULT_OUTCOMES: dict[str, frozenset[str]] = {
    "server_error": frozenset({"unavailable"}),
    "throttle": frozenset({"rate_limited", "unavailable"}),
    "maintenance": frozenset({"unavailable"}),
    "timeout": frozenset({"unavailable"}),
    "timeout_after_apply": frozenset({"unavailable"}),
    "expired_credential": frozenset({"auth"}),
    "malformed": frozenset({"protocol"}),
}
FAULT_LEVEL: dict[str, int] = {"expired_credential": LEVEL_CREDENTIAL}


@dataclass(frozen=True)
class Violation:
    invariant: str  # "I1" … "I6" (docs/reliability.md "Invariants"), or "E2"
    subject: str  # "store/order/line", "sku", "store/listing", "store"
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.subject}: {self.detail}"


@dataclass(frozen=True)
class EpisodeRecord:
    """One fault episode as it was applied (``tests.helpers.faults`` produces these)."""

    store: str
    kind: str
    start: float  # wall clock (the simulators' clock)
    end: float
    hits: int  # requests the fault actually changed


@dataclass(frozen=True)
class StateChange:
    at: float  # wall clock
    store: str
    state: str
    level: int


@dataclass
class CheckReport:
    violations: list[Violation] = field(default_factory=list)
    lines: int = 0  # order lines held by the simulated malls
    booked: int = 0  # of those, with a booking
    parked: int = 0  # of those, parked
    unseen_cancelled: int = 0  # cancelled before goqd ever saw them: nothing to book
    skus: int = 0
    listings: int = 0  # linked listings checked for convergence
    values_set: int = 0  # absolute counts the malls applied (checked by I4)
    episodes: int = 0  # fault episodes checked for visibility
    checked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, invariant: str, subject: str, detail: str) -> None:
        self.violations.append(Violation(invariant, subject, detail))

    def summary(self) -> str:
        head = (
            f"checked {'/'.join(self.checked)}: {self.lines} mall lines ({self.booked} booked, "
            f"{self.parked} parked, {self.unseen_cancelled} cancelled unseen), {self.skus} SKUs, "
            f"{self.listings} listings, {self.values_set} values set, "
            f"{self.episodes} fault episodes: "
        )
        if self.ok:
            return head + "no violations"
        shown = "\n  ".join(str(v) for v in self.violations[:50])
        more = len(self.violations) - 50
        tail = f"\n  … and {more} more" if more > 0 else ""
        return head + f"{len(self.violations)} violation(s)\n  {shown}{tail}"


@dataclass
class _Ledger:
    """The parts of the ledger file the checker reads, loaded once."""

    totals: dict[str, int]
    products: dict[str, tuple[float, str]]  # sku -> created_at, first_store
    movements: dict[str, list[tuple[int, int, int, str, str, str, str, float, int]]]
    lines: dict[tuple[str, str, str], tuple[str, str, int, float]]  # listing, sku, booked, mall t
    parked: dict[tuple[str, str, str], str]  # -> listing key
    listings: dict[tuple[str, str], tuple[str | None, str]]  # -> sku, link_state
    outbox: dict[tuple[str, str], tuple[int, int]]  # -> quantity, version
    errors: list[tuple[str, int, str, float, float, int]]  # store, level, code, first, last, n

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> _Ledger:
        movements: dict[str, list[tuple[int, int, int, str, str, str, str, float, int]]] = (
            defaultdict(list)
        )
        for mv in queries.movements(conn):
            movements[mv.sku].append(
                (
                    mv.id,
                    mv.delta,
                    mv.total_after,
                    mv.cause,
                    mv.store,
                    mv.order_id,
                    mv.line_id,
                    mv.at,
                    mv.held_after,
                )
            )
        products = queries.products(conn)
        return cls(
            totals={p.sku: p.total for p in products},
            products={p.sku: (p.created_at, p.first_store) for p in products},
            movements=dict(movements),
            lines={
                (r.store, r.order_id, r.line_id): (
                    r.listing_key,
                    r.sku,
                    r.booked_qty,
                    r.mall_updated_at,
                )
                for r in queries.order_lines(conn)
            },
            parked={
                (r.store, r.order_id, r.line_id): r.listing_key for r in queries.parked_lines(conn)
            },
            listings={
                (r.store, r.listing_key): (r.sku, r.link_state) for r in queries.listings(conn)
            },
            outbox={
                (r.store, r.listing_key): (r.quantity, r.version) for r in queries.outbox(conn)
            },
            errors=[
                (e.store, e.level, e.code, e.first_seen, e.last_seen, e.count)
                for e in queries.errors(conn)
            ],
        )

    @classmethod
    def read(cls, path: str) -> _Ledger:
        """Load the ledger file at ``path`` through a connection that cannot write it."""
        with queries.open_read_only(path) as conn:
            return cls.load(conn)


def check(
    sims: Mapping[str, SimMall],
    ledger_path: str,
    *,
    invariants: Collection[str] = ("I1", "I2", "I3", "I4"),
    initial: Mapping[str, int] | None = None,
    keys: Mapping[str, Mapping[str, str]] | None = None,
    not_converging: Collection[str] = (),
    episodes: Sequence[EpisodeRecord] = (),
    metrics_text: str | None = None,
    states: Sequence[StateChange] | None = None,
    visibility_slack: float = 5.0,
) -> CheckReport:
    """Check ``invariants`` over the simulators ``sims`` (store name → mall) and the
    ledger file at ``ledger_path``; return every violation found.

    ``initial`` (SKU → the stock the scenario started with) cross-checks the ledger's
    import movements; ``keys`` (store → SKU → listing key) cross-checks which SKU each
    line was booked to. ``not_converging`` names stores that are expected to lag (for
    example still stopped for a new credential); convergence (I3) skips them.
    Visibility (I6) needs ``episodes`` and
    ``metrics_text`` (the ``/metrics`` exposition), and uses ``states`` when given.
    """
    led = _Ledger.read(ledger_path)
    report = CheckReport(checked=tuple(sorted(invariants)))
    report.skus = len(led.totals)
    if "I1" in invariants:
        _check_no_loss(report, sims, led, keys)
    if "I2" in invariants:
        _check_conservation(report, sims, led, initial)
    if "I3" in invariants:
        _check_convergence(report, sims, led, not_converging)
    if "I4" in invariants:
        _check_no_stale_overwrite(report, sims, led)
    if "I6" in invariants:
        _check_visibility(report, led, episodes, metrics_text, states, visibility_slack)
    return report


# ---------------------------------------------------------------------- I1: no loss


def _line_moves(led: _Ledger) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = defaultdict(int)
    for moves in led.movements.values():
        for _mid, delta, _after, cause, store, order_id, line_id, _at, _held in moves:
            if cause in ORDER_CAUSES:
                out[(store, order_id, line_id)] += delta
    return out


def _before_import(
    sims: Mapping[str, SimMall], led: _Ledger, line_moves: Mapping[tuple[str, str, str], int]
) -> dict[tuple[str, str, str], tuple[int, bool]]:
    """Lines the ledger booked without taking units off ("before_import": a sale in the
    product's first store older than the product, which the imported count already
    reflects). Value: (units not moved, whether the mall really took the order before
    the product was created)."""
    out: dict[tuple[str, str, str], tuple[int, bool]] = {}
    for ident, (_listing, sku, qty, _t) in led.lines.items():
        offset = qty + line_moves.get(ident, 0)
        if offset <= 0:
            continue
        created, first_store = led.products.get(sku, (math.inf, ""))
        sim = sims.get(ident[0])
        order = sim.orders.get(ident[1]) if sim is not None else None
        truly_before = order is not None and order.created_at < created
        out[ident] = (offset, ident[0] == first_store and truly_before)
    return out


def _check_no_loss(
    report: CheckReport,
    sims: Mapping[str, SimMall],
    led: _Ledger,
    keys: Mapping[str, Mapping[str, str]] | None,
) -> None:
    line_moves = _line_moves(led)
    before = _before_import(sims, led, line_moves)
    mall_lines: set[tuple[str, str, str]] = set()
    for store, sim in sims.items():
        sku_of = {key: sku for sku, key in (keys or {}).get(store, {}).items()}
        for order in sim.orders.values():
            for line in order.lines:
                ident = (store, order.order_id, line.line_id)
                mall_lines.add(ident)
                report.lines += 1
                subject = "/".join(ident)
                want = 0 if (order.cancelled or line.cancelled) else line.quantity
                booked = led.lines.get(ident)
                parked = led.parked.get(ident)
                if booked is not None and parked is not None:
                    report.add("I1", subject, "both booked and parked")
                if booked is None:
                    if parked is not None:
                        report.parked += 1
                        state = led.listings.get((store, parked), (None, "missing"))[1]
                        if state == "linked":
                            report.add(
                                "I1", subject, f"parked although listing {parked!r} is linked"
                            )
                    elif want == 0:
                        report.unseen_cancelled += 1
                    else:
                        report.add("I1", subject, f"lost: the mall has {want} unit(s), no booking")
                    continue
                report.booked += 1
                _listing, sku, qty, _t = booked
                if qty != want:
                    report.add("I1", subject, f"booked {qty}, the mall's latest quantity is {want}")
                expected_sku = sku_of.get(line.listing_key)
                if expected_sku is not None and sku != expected_sku:
                    report.add("I1", subject, f"booked to SKU {sku!r}, listed as {expected_sku!r}")
                moved = line_moves.get(ident, 0)
                offset, legit = before.get(ident, (0, True))
                if offset and not legit:
                    created = led.products.get(sku, (0.0, ""))[0]
                    report.add(
                        "I1",
                        subject,
                        f"booked as a sale from before the import (no units taken off), but "
                        f"the mall took it {order.created_at - created:+.3f}s after the product "
                        f"was created (mall time shown as {_t:.3f}): {offset} unit(s) never "
                        "came off the total",
                    )
                elif moved != -(qty - offset):
                    report.add(
                        "I1",
                        subject,
                        f"movements for the line add up to {moved}, not {-(qty - offset)}: "
                        "applied more or less than once",
                    )
    for ident in led.lines.keys() - mall_lines:
        if ident[0] in sims:
            report.add("I1", "/".join(ident), "booked, but no simulated mall has this line")


# ----------------------------------------------------------------- I2: conservation


def _check_conservation(
    report: CheckReport,
    sims: Mapping[str, SimMall],
    led: _Ledger,
    initial: Mapping[str, int] | None,
) -> None:
    before = _before_import(sims, led, _line_moves(led))
    booked: dict[str, int] = defaultdict(int)
    for ident, (_listing, sku, qty, _t) in led.lines.items():
        offset, legit = before.get(ident, (0, True))
        booked[sku] += qty - (offset if legit else 0)
    for sku, total in sorted(led.totals.items()):
        moves = led.movements.get(sku, [])
        start = sum(m[1] for m in moves if m[3] == "import")
        operator = sum(m[1] for m in moves if m[3] in OPERATOR_CAUSES)
        if total != start + operator - booked[sku]:
            report.add(
                "I2",
                sku,
                f"total {total} != initial {start} + operator {operator} - booked {booked[sku]}",
            )
        if total != sum(m[1] for m in moves):
            report.add("I2", sku, f"total {total} != sum of movements {sum(m[1] for m in moves)}")
        running = 0
        for mid, _delta, after, *_rest in moves:
            running += _delta
            if after != running:
                report.add("I2", sku, f"movement {mid}: total_after {after}, expected {running}")
                break
        if initial is not None and sku in initial and start != initial[sku]:
            report.add(
                "I2", sku, f"initial stock {start} in the ledger, scenario set {initial[sku]}"
            )
        unknown = {m[3] for m in moves} - OPERATOR_CAUSES - ORDER_CAUSES - HOLD_CAUSES - {"import"}
        if unknown:
            report.add("I2", sku, f"movements with unknown causes {sorted(unknown)}")


# ------------------------------------------------------------------ I3: convergence


def _check_convergence(
    report: CheckReport,
    sims: Mapping[str, SimMall],
    led: _Ledger,
    not_converging: Collection[str],
) -> None:
    for (store, key), (sku, state) in sorted(led.listings.items()):
        if store not in sims or store in not_converging or state != "linked" or sku is None:
            continue
        report.listings += 1
        want = max(0, led.totals[sku])
        listing = sims[store].listings.get(key)
        subject = f"{store}/{key}"
        if listing is None:
            report.add("I3", subject, "linked in the ledger, unknown at the mall")
            continue
        if listing.quantity != want:
            report.add("I3", subject, f"mall shows {listing.quantity}, ledger total gives {want}")
        pending = led.outbox.get((store, key))
        if pending is not None:
            report.add("I3", subject, f"push still pending (quantity {pending[0]}, v{pending[1]})")


# ----------------------------------------------------------- I4: no stale overwrite


def _count_after(
    moves: Sequence[tuple[int, int, int, str, str, str, str, float, int]],
) -> list[int]:
    """The count goqd pushed after each movement: its total less the units held."""
    return [max(0, m[2] - m[8]) for m in moves]


def _match_history(
    values: Sequence[int],
    times: Sequence[float] | None,
    counts: Sequence[int],
    at: Sequence[float],
) -> tuple[list[int], int | None]:
    """Map each applied value to a movement index, non-decreasing, earliest possible.

    Returns the indexes and the position of the first value that cannot be mapped (a
    stale or invented write), or None. With ``times``, a value applied at time ``s`` may
    only map to a movement made at or before ``s`` (a mall cannot show a count the
    ledger had not computed yet). Taking the earliest feasible index is optimal: any
    mapping of the rest that works after a later choice also works after an earlier one.
    """
    out: list[int] = []
    j = 0
    for n, value in enumerate(values):
        limit = times[n] if times is not None else math.inf
        k = j
        while k < len(counts) and not (counts[k] == value and at[k] <= limit + 1e-6):
            k += 1
        if k == len(counts):
            return out, n
        out.append(k)
        j = k
    return out, None


def _check_no_stale_overwrite(
    report: CheckReport, sims: Mapping[str, SimMall], led: _Ledger
) -> None:
    for (store, key), (sku, _state) in sorted(led.listings.items()):
        sim = sims.get(store)
        if sim is None or sku is None or key not in sim.listings:
            continue
        history = sim.listings[key].set_history
        if not history:
            continue
        report.values_set += len(history)
        moves = led.movements.get(sku, [])
        times = getattr(history, "times", None)
        _idx, bad = _match_history(list(history), times, _count_after(moves), [m[7] for m in moves])
        if bad is not None:
            when = f" at t={times[bad]:.3f}" if times is not None else ""
            context = list(history)[max(0, bad - 3) : bad + 1]
            report.add(
                "I4",
                f"{store}/{key}",
                f"value #{bad} ({history[bad]}{when}) goes back to an older count or matches "
                f"no ledger count; last values set {context}, ledger counts "
                f"{_count_after(moves)[-8:]}",
            )


# -------------------------------------------------------------------- I5: isolation


def propagation_delays(
    sims: Mapping[str, SimMall],
    ledger_path: str,
    store: str,
    *,
    since: float = -math.inf,
    causes: Collection[str] = ORDER_CAUSES,
) -> list[float]:
    """Seconds from each ledger change (of ``causes``, made at or after ``since``) of a
    SKU linked in ``store`` until that store's mall was next written for the listing.

    Needs listings whose ``set_history`` records times (``tests.helpers.rig`` installs
    one). A change never followed by a write counts as ``inf``.
    """
    led = _Ledger.read(ledger_path)
    sim = sims[store]
    delays: list[float] = []
    for (st, key), (sku, state) in led.listings.items():
        if st != store or sku is None or state != "linked" or key not in sim.listings:
            continue
        times: Sequence[float] | None = getattr(sim.listings[key].set_history, "times", None)
        if times is None:
            raise ValueError("propagation_delays needs set_history with times")
        for m in led.movements.get(sku, []):
            if m[3] not in causes or m[7] < since:
                continue
            later = [t for t in times if t >= m[7]]
            delays.append(min(later) - m[7] if later else math.inf)
    return delays


def check_isolation(delays: Iterable[float], bound: float, store: str) -> list[Violation]:
    """Isolation (I5): every change reached the healthy ``store`` within ``bound`` seconds."""
    slow = sorted(d for d in delays if d > bound)
    if not slow:
        return []
    return [
        Violation(
            "I5",
            store,
            f"{len(slow)} change(s) reached this healthy store later than {bound:g}s "
            f"(worst {slow[-1]:.2f}s)",
        )
    ]


# ------------------------------------------------------------------- I6: visibility


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus exposition into {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _outcome_count(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
    store: str,
    outcomes: Collection[str],
) -> float:
    total = 0.0
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if lab.get("store") != store:
            continue
        if (
            name in ("goqd_polls_total", "goqd_mall_requests_total")
            and lab.get("outcome") in (outcomes)
        ) or (name == "goqd_pushes_total" and lab.get("outcome") == "failed"):
            total += value
    return total


def _check_visibility(
    report: CheckReport,
    led: _Ledger,
    episodes: Sequence[EpisodeRecord],
    metrics_text: str | None,
    states: Sequence[StateChange] | None,
    slack: float,
) -> None:
    samples = metric_samples(metrics_text) if metrics_text is not None else None
    for ep in episodes:
        outcomes = FAULT_OUTCOMES.get(ep.kind)
        if ep.hits == 0 or outcomes is None:
            continue  # nothing reached the daemon, or a fault only a diff can show
        report.episodes += 1
        subject = f"{ep.store}"
        what = f"{ep.kind} episode {ep.start:.1f}–{ep.end:.1f} ({ep.hits} hit(s))"
        if samples is not None and _outcome_count(samples, ep.store, outcomes) <= 0:
            report.add("I6", subject, f"{what}: no metric shows it")
        level = FAULT_LEVEL.get(ep.kind, LEVEL_TEMPORARY)
        seen = [
            e
            for e in led.errors
            if e[0] == ep.store
            and e[1] == level
            and e[3] <= ep.end + slack
            and e[4] >= ep.start - slack
        ]
        if not seen:
            report.add("I6", subject, f"{what}: no level-{level} error recorded during it")
        if states is not None:
            want = "stopped" if level == LEVEL_CREDENTIAL else "degraded"
            if not _state_shown(states, ep.store, level, ep.start - slack, ep.end + slack):
                report.add("I6", subject, f"{what}: the store's state never showed {want}")


def _state_shown(
    states: Sequence[StateChange], store: str, level: int, start: float, end: float
) -> bool:
    """Was the store degraded (a temporary error) or stopped (a credential error), at
    ``level`` or above, at some moment in [start, end]?"""
    mine = sorted((s for s in states if s.store == store), key=lambda s: s.at)
    before = [s for s in mine if s.at <= start]
    during = [s for s in mine if start < s.at <= end]
    for s in before[-1:] + during:
        if s.state in ("degraded", "stopped", "down") and s.level >= level:
            return True
    return False


# -------------------------------------------------------------- E2: throttling


def check_throttling(
    sim: SimMall,
    store: str,
    records: Sequence[EpisodeRecord],
    episodes: Sequence[object],
    *,
    tolerance: float = 0.05,
) -> list[Violation]:
    """Throttling (docs/reliability.md catalogue entry E2) from the mall's request log.

    * Every 429 outside an injected throttle episode means goqd went over the mall's
      documented rate (the simulators enforce it themselves).
    * After a 429 with ``Retry-After: R`` (``episodes`` carry ``retry_after``), the next
      request to the same API comes at least R seconds later. The log records response
      times, which bound send times from above, so this is a necessary condition. A
      simulator that sends no Retry-After (``retry_after_header = False``: SP-API rarely
      does) is only checked for overruns.
    """
    sends_header = bool(getattr(sim, "retry_after_header", True))
    throttles = [r for r in records if r.store == store and r.kind == "throttle"]
    planned = [e for e in episodes if getattr(e, "kind", "") == "throttle"]
    windows = [
        (r.start, r.end, float(getattr(e, "retry_after", 0.0)))
        for r, e in zip(throttles, planned, strict=False)
    ]
    out: list[Violation] = []
    log = sim.requests
    for i, req in enumerate(log):
        if req.status != 429:
            continue
        window = next((w for w in windows if w[0] <= req.at <= w[1] + tolerance), None)
        if window is None:
            out.append(
                Violation(
                    "E2",
                    store,
                    f"429 on {req.api} at t={req.at:.3f} outside any injected "
                    "throttle: goqd went over the mall's rate",
                )
            )
            continue
        retry_after = window[2]
        if not sends_header:
            continue
        nxt = next((r for r in log[i + 1 :] if r.api == req.api), None)
        if nxt is not None and nxt.at < req.at + retry_after - tolerance:
            out.append(
                Violation(
                    "E2",
                    store,
                    f"{req.api}: next request {nxt.at - req.at:.2f}s after a 429 with "
                    f"Retry-After {retry_after:g}s",
                )
            )
    return out
