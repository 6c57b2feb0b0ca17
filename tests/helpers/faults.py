"""Seeded fault plans for the simulated malls (docs/reliability.md, "Harness" item 1).

A ``FaultPlan`` is a schedule of fault *episodes*: on store S, from t₀ for d seconds,
answer with 5xx / 429 + Retry-After / maintenance / malformed bodies, time out before or
after applying a push, silently ignore pushes, or expire the credential. ``make_plan``
draws one from a seed (the same seed gives the same plan); ``run_plan`` applies it to the
simulators' ``Faults`` switches on the trio clock, acts as the operator where the
catalogue says one acts (``goqctl key set`` after an expired key, ``diff`` + ``reflect``
after a silent no-op), and returns what it did as ``EpisodeRecord``s with the number of
requests each episode actually changed (its *hits*), which the checker needs for
visibility (I6 in docs/reliability.md "Invariants").

Episodes of one store never overlap (so an episode's end restores a clean mall); those of
different stores overlap freely, which is what isolation (I5) is about.

What it must never do: touch the daemon or the ledger. It only flips simulator switches
and calls the operator callbacks the caller passes in.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from goqd.sim.base import Faults, SimMall
from goqd.sim.http import Request, Response
from goqd.wallclock import WallClock
from tests.helpers.checker import EpisodeRecord

FaultKind = Literal[
    "server_error",  # 5xx at ``rate``
    "throttle",  # 429 (or the mall's throttle) at ``rate`` with Retry-After ``retry_after``
    "maintenance",  # orders and stock down together
    "timeout",  # every response delayed ``latency`` s, past the client timeout: not applied
    "timeout_after_apply",  # a push is applied, then its response never comes
    "malformed",  # 200 with a body spoiled as ``variant`` says
    "silent_noop",  # pushes accepted and not applied
    "expired_credential",  # every key expires; renewed through the operator at the end
    "late_apply",  # a push reaches the mall ``latency`` s late: after the client gave up
]
KINDS: tuple[FaultKind, ...] = (
    "server_error",
    "throttle",
    "maintenance",
    "timeout",
    "timeout_after_apply",
    "malformed",
    "silent_noop",
    "expired_credential",
)
# Not in KINDS (the default mix): goqd has no defence against it yet — see
# tests/integration/test_reliability_faults.py::test_a_push_applied_after_its_timeout_is_repaired.
EXTRA_KINDS: tuple[FaultKind, ...] = ("late_apply",)
MALFORMED = ("missing_field", "wrong_type", "html", "truncated")

# The API name (``SimMall.api_name``) of each mall's stock update: the one call that
# "timeout after apply" and "silent no-op" change.
PUSH_APIS: dict[str, frozenset[str]] = {
    "rakuten": frozenset({"inventories.bulk.upsert"}),
    "yahoo": frozenset({"setStock"}),
    "aupay": frozenset({"updateStock"}),
    "shopify": frozenset({"GoqdSetQuantities"}),
    "amazon": frozenset({"patchListingsItem"}),
}


@dataclass(frozen=True)
class Episode:
    store: str
    kind: FaultKind
    start: float  # seconds after the plan starts
    duration: float
    rate: float = 1.0
    retry_after: float = 1.0
    variant: str = ""
    latency: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.duration

    def describe(self) -> str:
        extra = {
            "server_error": f" rate={self.rate:.2f}",
            "throttle": f" rate={self.rate:.2f} retry_after={self.retry_after:g}s",
            "malformed": f" {self.variant}",
            "timeout": f" latency={self.latency:g}s",
            "late_apply": f" latency={self.latency:g}s",
        }.get(self.kind, "")
        return f"{self.store}: {self.kind}{extra} {self.start:.0f}s–{self.end:.0f}s"


@dataclass(frozen=True)
class FaultPlan:
    seed: int
    episodes: tuple[Episode, ...]

    @property
    def end(self) -> float:
        return max((e.end for e in self.episodes), default=0.0)

    def describe(self) -> str:
        lines = [f"fault plan seed={self.seed}: {len(self.episodes)} episodes"]
        lines += [f"  {e.describe()}" for e in sorted(self.episodes, key=lambda e: e.start)]
        return "\n".join(lines)


def make_plan(
    seed: int,
    stores: Sequence[str],
    *,
    duration: float,
    kinds: Collection[FaultKind] = KINDS,
    per_store: tuple[int, int] = (1, 3),
    length: tuple[float, float] = (20.0, 120.0),
    latency: float = 60.0,
    retry_after: tuple[float, float] = (1.0, 30.0),
    exclude: Mapping[str, Collection[FaultKind]] | None = None,
    healthy: Collection[str] = (),
) -> FaultPlan:
    """Draw a plan over ``duration`` seconds from ``seed``.

    Each store not in ``healthy`` gets ``per_store`` episodes (inclusive range) of kinds
    from ``kinds`` minus ``exclude[store]``, each ``length`` seconds long, in order and
    apart. ``latency`` (for ``timeout``) must exceed the daemon's request timeout.
    """
    rng = random.Random(seed)
    episodes: list[Episode] = []
    for store in stores:
        if store in healthy:
            continue
        allowed = sorted(set(kinds) - set((exclude or {}).get(store, ())))
        if not allowed:
            continue
        n = rng.randint(*per_store)
        # n episodes in n equal slots, each placed at random inside its slot.
        slot = duration / n
        for i in range(n):
            span = min(rng.uniform(*length), slot * 0.8)
            start = i * slot + rng.uniform(0, slot - span)
            kind: FaultKind = rng.choice(allowed)
            episodes.append(
                Episode(
                    store=store,
                    kind=kind,
                    start=round(start, 3),
                    duration=round(span, 3),
                    rate=(
                        rng.choice((1.0, 1.0, 0.5)) if kind in ("server_error", "throttle") else 1.0
                    ),
                    retry_after=round(rng.uniform(*retry_after), 1) if kind == "throttle" else 1.0,
                    variant=rng.choice(MALFORMED) if kind == "malformed" else "",
                    latency=latency if kind in ("timeout", "late_apply") else 0.0,
                )
            )
    return FaultPlan(seed=seed, episodes=tuple(sorted(episodes, key=lambda e: (e.start, e.store))))


# ------------------------------------------------------------------------------ running

# ``renew(store, credentials)`` is the operator's ``goqctl key set``; ``reflect(store)`` the
# operator's ``goqctl diff`` + ``reflect`` after a silent no-op. Each returns True once it
# worked; run_plan retries it (the mall may be in another episode by then).
Renew = Callable[[str, dict[str, str]], Awaitable[bool]]
Reflect = Callable[[str], Awaitable[bool]]


@dataclass
class _Active:
    episode: Episode
    started_at: float
    hits: int = 0


@dataclass
class _Tap:
    """Wraps one simulator's request handler to count what active episodes changed."""

    sim: SimMall
    push_apis: frozenset[str]
    active: list[_Active] = field(default_factory=list)
    nursery: trio.Nursery | None = None  # where late deliveries run on

    def install(self) -> None:
        app: Any = self.sim.app
        inner = app._handler  # goqd.sim.http.App keeps the simulator's dispatch here

        async def tapped(request: Request) -> Response:
            api = self.sim.api_name(request)
            live = list(self.active)
            late: _Active | None = None
            for a in live:
                kind = a.episode.kind
                if kind == "timeout" or (
                    kind in ("timeout_after_apply", "silent_noop", "late_apply")
                    and api in self.push_apis
                ):
                    a.hits += 1  # counted on entry: the response may never come
                if kind == "late_apply" and api in self.push_apis:
                    late = a
            if late is not None and self.nursery is not None:
                return await self._deliver_late(inner, request, late.episode.latency)
            response: Response = await inner(request)
            for a in live:
                if _changed(a.episode.kind, response.status):
                    a.hits += 1
            return response

        app._handler = tapped

    async def _deliver_late(self, inner: Any, request: Request, delay: float) -> Response:
        """The request sits in the mall's queue for ``delay`` seconds, then is applied —
        whether or not the client is still waiting (it runs in the plan's nursery)."""
        assert self.nursery is not None
        box: list[Response] = []
        done = trio.Event()

        async def deliver() -> None:
            await trio.sleep(delay)
            box.append(await inner(request))
            done.set()

        self.nursery.start_soon(deliver)
        await done.wait()
        return box[0]


def _tap_of(sim: SimMall) -> _Tap:
    """The simulator's tap, installed once however many plans run on it."""
    app: Any = sim.app
    tap: _Tap | None = getattr(app, "_goqd_tap", None)
    if tap is None:
        tap = _Tap(sim, PUSH_APIS.get(sim.mall, frozenset()))
        tap.install()
        app._goqd_tap = tap
    return tap


def _changed(kind: FaultKind, status: int) -> bool:
    match kind:
        case "server_error":
            return status >= 500
        case "maintenance":
            return status >= 500 or status == 403
        case "throttle":
            return status == 429 or status == 503
        case "expired_credential":
            return status in (400, 401, 403)
        case "malformed":
            return status == 200
    return False


def _apply(sim: SimMall, ep: Episode) -> None:
    f = sim.faults
    match ep.kind:
        case "server_error":
            f.error_rate = ep.rate
        case "throttle":
            f.throttle_rate = ep.rate
            f.retry_after = ep.retry_after
        case "maintenance":
            f.maintenance = True
        case "timeout":
            f.latency = ep.latency
        case "timeout_after_apply":
            f.timeout_after_apply = True
        case "late_apply":
            pass  # done by the tap
        case "malformed":
            f.malformed = ep.variant
        case "silent_noop":
            f.silent_noop = True
        case "expired_credential":
            expire = getattr(sim, "expire_credentials", None)
            if expire is not None:
                expire()
            else:
                f.expired_credential = True


def _revert(sim: SimMall, ep: Episode) -> dict[str, str] | None:
    """Undo an episode; for an expired credential return the newly issued one."""
    clean = Faults()
    f = sim.faults
    match ep.kind:
        case "server_error":
            f.error_rate = clean.error_rate
        case "throttle":
            f.throttle_rate = clean.throttle_rate
            f.retry_after = clean.retry_after
        case "maintenance":
            f.maintenance = False
        case "timeout":
            f.latency = clean.latency
        case "timeout_after_apply":
            f.timeout_after_apply = False
        case "malformed":
            f.malformed = ""
        case "silent_noop":
            f.silent_noop = False
        case "expired_credential":
            f.expired_credential = False
            issue = getattr(sim, "issue_credentials", None)
            if issue is not None:
                fresh: dict[str, str] = issue()
                return fresh
            return sim.credentials()
    return None


async def _until_done(action: Callable[[], Awaitable[bool]], every: float, limit: float) -> bool:
    """Retry an operator action every ``every`` seconds until it works (an operator who
    gets "unavailable" tries again a little later), for at most ``limit`` seconds."""
    with trio.move_on_after(limit):
        while True:
            if await action():
                return True
            await trio.sleep(every)
    return False


async def run_plan(
    plan: FaultPlan,
    sims: Mapping[str, SimMall],
    *,
    clock: WallClock,
    renew: Renew | None = None,
    reflect: Reflect | None = None,
    operator_retry: float = 5.0,
    operator_limit: float = 600.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> list[EpisodeRecord]:
    """Apply ``plan`` to ``sims`` (store → simulator) starting now; return the records.

    Returns when the last episode has ended and every operator action it triggered has
    succeeded (or given up after ``operator_limit`` seconds, which the caller will see
    as a convergence (I3) violation). Cancelling it leaves the switches as they are: call
    ``clear_faults`` to restore clean malls.
    """
    taps = {store: _tap_of(sim) for store, sim in sims.items()}
    t0 = trio.current_time()
    events: list[tuple[float, int, Episode]] = []
    for ep in plan.episodes:
        events.append((ep.start, 1, ep))
        events.append((ep.end, 0, ep))  # ends sort before starts at the same instant
    events.sort(key=lambda e: (e[0], e[1], e[2].store))
    actives: dict[Episode, _Active] = {}
    records: list[EpisodeRecord] = []
    task_status.started()
    async with trio.open_nursery() as operators:
        for tap in taps.values():
            tap.nursery = operators
        for at, is_start, ep in events:
            await trio.sleep_until(t0 + at)
            sim, tap = sims[ep.store], taps[ep.store]
            if is_start:
                active = _Active(ep, clock())
                actives[ep] = active
                tap.active.append(active)
                _apply(sim, ep)
                continue
            active = actives.pop(ep)
            tap.active.remove(active)
            fresh = _revert(sim, ep)
            records.append(
                EpisodeRecord(
                    store=ep.store,
                    kind=ep.kind,
                    start=active.started_at,
                    end=clock(),
                    hits=active.hits,
                )
            )
            if ep.kind == "expired_credential" and renew is not None and fresh is not None:
                store, creds = ep.store, fresh
                operators.start_soon(
                    _until_done,
                    lambda store=store, creds=creds: renew(store, creds),
                    operator_retry,
                    operator_limit,
                )
            if ep.kind == "silent_noop" and reflect is not None:
                store = ep.store
                operators.start_soon(
                    _until_done,
                    lambda store=store: reflect(store),
                    operator_retry,
                    operator_limit,
                )
    return records


def clear_faults(sims: Mapping[str, SimMall]) -> None:
    """Every switch back off (credentials are not re-issued: use the plan for that)."""
    for sim in sims.values():
        sim.faults = Faults()


def injected(records: Sequence[EpisodeRecord]) -> dict[str, int]:
    """Faulted responses per kind: the "faults injected" figure of a run."""
    out: dict[str, int] = {}
    for r in records:
        out[r.kind] = out.get(r.kind, 0) + r.hits
    return out
