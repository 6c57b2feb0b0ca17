"""The contract every mall in ``goqd/malls/registry.py`` meets, over real loopback HTTP.

Parametrised over the registry, so a new mall is held to it from the moment its name is
in ``goqd/mallnames.py``: it needs a simulator (``SIM`` in ``goqd/sim/<mall>.py``), a ``MallSpec``
with the facts the rest of goqd reads, fixtures under ``tests/fixtures/<mall>/`` and a
test file; and its adapter, against its simulator, must poll an order as order lines,
push a count the simulator then shows, list the listings, and map the mall's answers
onto goqd's error tree. Every failure says which mall lacks what, and where to add it.

The adapter is tested without the registry's guard (``open_registered_adapter``): the
guard turns any exception into a ``MallProtocolError``, so an adapter that crashed on a
strange body would pass as one that classified it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing

from goqd.errors import (
    LEVEL_CREDENTIAL,
    LEVEL_TEMPORARY,
    MallAuthError,
    MallError,
    MallProtocolError,
    MallRateLimited,
    MallUnavailable,
)
from goqd.malls.base import (
    RETRY_AFTER_CAP_S,
    MallAdapter,
    MallLimits,
    MallSpec,
    option_problem,
)
from goqd.malls.registry import MALLS
from goqd.messages import PushItem
from goqd.sim.base import SimMall
from goqd.sim.registry import SIMS
from tests.helpers import paths
from tests.helpers.malls import open_registered_adapter, serve_mall, store_context

TESTS = paths.TESTS
EPOCH = 1_767_225_600.0  # 2026-01-01 09:00 JST
SHOP_ID = "123456"
STORE = "contract"
SKU = "CONTRACT-1"
# Long enough for any simulated mall to publish an order and for rate buckets to drain
# under the autojump clock; a deadlock still ends the test.
BOUND_S = 3 * 86400.0

MALL_NAMES = sorted(MALLS)
# Every way a simulator can spoil a 200 answer (``Faults.malformed``).
MALFORMED = ("missing_field", "wrong_type", "html", "truncated")
# What a store actor and the operator tools call on an adapter.
CALLS = (
    "check_credentials",
    "fetch_orders",
    "push_stock",
    "read_stock",
    "iter_listings",
    "credential_expiry",
)
ADAPTER_ATTRIBUTES = ("mall", "limits")


def wall() -> float:
    return EPOCH + trio.current_time()


# --------------------------------------------------------------------------------------
# What a mall must have: checked without any network
# --------------------------------------------------------------------------------------


async def contract_problems(mall: str) -> list[str]:
    """Everything ``mall`` lacks to be a complete goqd mall, each as a sentence that
    says where to add it. Empty when nothing is missing."""
    spec = MALLS.get(mall)
    if spec is None:
        return [f"mall {mall!r} is not registered: add its name to goqd/mallnames.py"]
    problems = spec_problems(mall, spec)
    sim_spec = SIMS.get(mall)
    sim: SimMall | None = None
    if sim_spec is None:
        problems.append(
            f"mall {mall!r} has no simulator: write goqd/sim/{mall}.py (a SimMall subclass) "
            f"exporting SIM, a SimSpec for it"
        )
    else:
        if sim_spec.mall != mall or sim_spec.cls.mall != mall:
            problems.append(
                f"mall {mall!r}: the SIM of goqd/sim/{mall}.py says it is mall "
                f"{sim_spec.mall!r} and its class {sim_spec.cls.__name__} sets mall = "
                f"{sim_spec.cls.mall!r}; both must be {mall!r}"
            )
        sim = sim_spec.cls(shop_id=SHOP_ID, clock=lambda: EPOCH)
        issued = sim.credentials()
        lacking = [f for f in spec.credential_fields if f not in issued]
        if lacking:
            problems.append(
                f"mall {mall!r}: {sim_spec.cls.__name__}.credentials() lacks "
                f"{', '.join(lacking)}, which MallSpec.credential_fields requires"
            )
        known = set(spec.credential_fields) | set(spec.optional_fields)
        unnamed = sorted(f for f in issued if f not in known)
        if unnamed:
            problems.append(
                f"mall {mall!r}: {sim_spec.cls.__name__}.credentials() issues "
                f"{', '.join(unnamed)}, which MallSpec names neither in credential_fields "
                f"nor in optional_fields"
            )
        refused = option_problem(spec, sim_spec.options)
        if refused is not None:
            problems.append(
                f"mall {mall!r}: the SIM of goqd/sim/{mall}.py sets option {refused[0]!r}, which "
                f"MallSpec.options refuses ({refused[1]})"
            )
    problems.extend(await adapter_problems(mall, spec, sim))
    fixtures = TESTS / "fixtures" / mall
    if not fixtures.is_dir() or not any(fixtures.iterdir()):
        problems.append(
            f"mall {mall!r} has no fixtures: put real-shaped answers of the mall under "
            f"tests/fixtures/{mall}/"
        )
    if not (TESTS / "malls" / f"test_{mall}.py").is_file():
        problems.append(
            f"mall {mall!r} has no test file: write tests/malls/test_{mall}.py for what is "
            f"particular to the mall"
        )
    return problems


def spec_problems(mall: str, spec: MallSpec) -> list[str]:
    """The facts on ``MallSpec`` that goqd reads and that ``spec`` lacks."""
    where = f"mall {mall!r}: MallSpec in goqd/malls/{mall}.py"
    problems: list[str] = []
    if spec.name != mall:
        problems.append(f"{where} is named {spec.name!r}, not {mall!r}")
    if not spec.title.strip():
        problems.append(f"{where} has no title (the name operators read, e.g. '楽天市場')")
    if not spec.credential_fields:
        problems.append(f"{where} names no credential_fields (the keys of the credential file)")
    both = sorted(set(spec.credential_fields) & set(spec.optional_fields))
    if both:
        problems.append(f"{where} lists {', '.join(both)} as both required and optional")
    if spec.secret_fields is not None:
        known = set(spec.credential_fields) | set(spec.optional_fields)
        stray = [f for f in spec.secret_fields if f not in known]
        if stray:
            problems.append(
                f"{where} marks {', '.join(stray)} secret but names no such credential field"
            )
        if not spec.secret_fields:
            problems.append(
                f"{where} marks no credential field secret (secret_fields=()): say which "
                f"ones are, or leave it None to treat them all as secret"
            )
    problems.extend(limits_problems(where, spec.limits))
    problems.extend(expiry_problems(where, spec))
    if not spec.default_live_statuses:
        problems.append(
            f"{where} has no default_live_statuses (the order statuses that hold stock)"
        )
    if not spec.default_cancel_statuses:
        problems.append(
            f"{where} has no default_cancel_statuses (the order statuses that give it back)"
        )
    for name, option in spec.options.items():
        if option.default is not None and option_problem(spec, {name: option.default}):
            problems.append(f"{where}: option {name!r} refuses its own default")
    return problems


def expiry_problems(where: str, spec: MallSpec) -> list[str]:
    """What ``goqd.expiry`` and the operator's messages need to know of the credential."""
    expiry = spec.expiry
    if expiry is None:
        return [
            f"{where} has no expiry (KeyExpiry: what the credential is called, where its "
            f"expiry comes from and how an operator renews it)"
        ]
    problems = []
    if not expiry.credential.strip():
        problems.append(f"{where}: expiry.credential does not name the credential")
    if "goqctl key set" not in expiry.renewal:
        problems.append(
            f"{where}: expiry.renewal does not end in how to install the new credential "
            f"(`goqctl key set {{store}} --file new.json`)"
        )
    known = set(spec.credential_fields) | set(spec.optional_fields)
    if expiry.field and expiry.field not in known:
        problems.append(
            f"{where}: expiry.field {expiry.field!r} is not a credential field; add it to "
            f"optional_fields"
        )
    if not (math.isfinite(expiry.lifetime_s) and expiry.lifetime_s >= 0):
        problems.append(f"{where}: expiry.lifetime_s must be 0 or more seconds")
    return problems


def limits_problems(where: str, limits: object) -> list[str]:
    if not isinstance(limits, MallLimits):
        return [f"{where} has no MallLimits (limits=)"]
    problems = [
        f"{where}: limits.{name} must be above 0, not {getattr(limits, name)!r}"
        for name in ("push_batch", "read_batch", "min_poll_interval")
        if not getattr(limits, name) > 0
    ]
    if limits.watch_max < 0:
        problems.append(f"{where}: limits.watch_max must be 0 or more")
    return problems


async def adapter_problems(mall: str, spec: MallSpec, sim: SimMall | None) -> list[str]:
    """What the adapter the registry opens for ``mall`` lacks of ``MallAdapter``."""
    where = f"mall {mall!r}: the adapter goqd/malls/registry.py opens"
    credentials = (
        sim.credentials() if sim is not None else dict.fromkeys(spec.credential_fields, "x")
    )

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no network in the contract's static check", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        ctx = store_context(mall, "http://127.0.0.1:9", http, wall, credentials, store=STORE)
        try:
            adapter: Any = open_registered_adapter(ctx)
        except Exception as exc:
            return [f"{where} could not be opened: {type(exc).__name__}: {exc}"]
    lacking = [name for name in CALLS if not callable(getattr(adapter, name, None))]
    lacking += [name for name in ADAPTER_ATTRIBUTES if not hasattr(adapter, name)]
    problems = []
    if lacking:
        problems.append(f"{where} lacks {', '.join(lacking)} of MallAdapter (goqd/malls/base.py)")
    if getattr(adapter, "mall", mall) != mall:
        problems.append(f"{where} says its mall is {adapter.mall!r}")
    return problems


@pytest.mark.parametrize("mall", MALL_NAMES)
async def test_mall_has_everything_goqd_needs(mall: str) -> None:
    with trio.fail_after(60):
        problems = await contract_problems(mall)
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------------------
# The adapter against its simulator over loopback HTTP
# --------------------------------------------------------------------------------------


@dataclass
class Store:
    mall: str
    sim: SimMall
    adapter: MallAdapter
    key: str  # the listing goqd knows as SKU
    secrets: list[str]  # credential values that must never show in an error


@asynccontextmanager
async def open_store(mall: str) -> AsyncIterator[Store]:
    """``mall``'s simulator on 127.0.0.1 with one listing of 5, and its adapter opened
    through the registry as goqd's config would describe the store."""
    sim_spec = SIMS.get(mall)
    if sim_spec is None:
        pytest.fail(f"mall {mall!r} has no simulator: write goqd/sim/{mall}.py exporting SIM")
    sim = sim_spec.cls(shop_id=SHOP_ID, clock=wall)
    listing = sim_spec.add(sim, sim_spec.listing_key(SKU), SKU, "契約の商品", 5)
    spec = MALLS[mall]
    async with serve_mall(sim) as served:
        ctx = served.registry_context(store=STORE)
        secrets = [v.reveal() for k, v in ctx.credentials.items() if spec.is_secret_field(k)]
        yield Store(mall, sim, open_registered_adapter(ctx), listing.listing_key, secrets)


@pytest.fixture(params=MALL_NAMES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """One store of each registered mall in turn, against its simulator. pytest-trio
    uses a clock only when the test itself takes it: every test here takes
    ``autojump_clock``, so the mall's own waits (order lag, throttles) take no time."""
    async with open_store(request.param) as opened:
        yield opened


async def settle(store: Store) -> None:
    """Wait until an order placed now shows in the mall's order feed (Amazon publishes
    to getOrders about two minutes late)."""
    await trio.sleep(SIMS[store.mall].settle_s)


async def call(store: Store, name: str) -> object:
    """One ``MallAdapter`` call on the store's listing, drained if it is an iterator."""
    adapter = store.adapter
    if name == "fetch_orders":
        return await adapter.fetch_orders(None)
    if name == "push_stock":
        item = PushItem(listing_key=store.key, sku=SKU, quantity=4, version=1)
        return await adapter.push_stock([item])
    if name == "read_stock":
        return await adapter.read_stock([store.key])
    if name == "iter_listings":
        return [listing async for listing in adapter.iter_listings()]
    if name == "check_credentials":
        await adapter.check_credentials()
        return None
    assert name == "credential_expiry"
    return await adapter.credential_expiry()


async def test_adapter_polls_an_order_placed_at_its_simulator(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(BOUND_S):
        order = store.sim.place_order([(store.key, 2)])
        assert order is not None, f"{type(store.sim).__name__} refused an order of 2 of 5"
        await settle(store)
        page = await store.adapter.fetch_orders(None)
    lines = [line for line in page.lines if line.order_id == order.order_id]
    assert [(line.listing_key, line.link_code, line.quantity) for line in lines] == [
        (store.key, SKU, 2)
    ], (
        f"mall {store.mall!r}: fetch_orders did not return the order placed at the "
        f"simulator ({order.order_id}, 2 of {store.key}) as one line; it returned {page.lines}"
    )
    assert not lines[0].cancelled
    assert page.cursor, f"mall {store.mall!r}: fetch_orders returned no cursor to go on from"


async def test_adapter_pushes_a_count_its_simulator_then_shows(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(BOUND_S):
        outcomes = await store.adapter.push_stock(
            [PushItem(listing_key=store.key, sku=SKU, quantity=7, version=3)]
        )
        shown = store.sim.stock(store.key)
        read = await store.adapter.read_stock([store.key])
    assert [(o.listing_key, o.version, o.accepted) for o in outcomes] == [(store.key, 3, True)], (
        f"mall {store.mall!r}: push_stock did not report the one push as accepted: {outcomes}"
    )
    assert shown == 7, f"mall {store.mall!r}: pushed 7 but the simulator shows {shown}"
    assert read == {store.key: 7}, f"mall {store.mall!r}: read_stock after pushing 7: {read}"


async def test_adapter_lists_the_listings_of_its_simulator(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    sim_spec = SIMS[store.mall]
    other = sim_spec.add(store.sim, sim_spec.listing_key("OTHER-2"), "OTHER-2", "", 0)
    with trio.fail_after(BOUND_S):
        found = {x.listing_key: x async for x in store.adapter.iter_listings()}
    got = {key: (found[key].link_code, found[key].quantity) for key in found}
    assert got == {store.key: (SKU, 5), other.listing_key: ("OTHER-2", 0)}, (
        f"mall {store.mall!r}: iter_listings did not list the simulator's two listings "
        f"with their SKUs and counts: {got}"
    )


def _auth_rejected(sim: SimMall) -> None:
    sim.faults.expired_credential = True


def _maintenance(sim: SimMall) -> None:
    sim.faults.maintenance = True


def _server_error(sim: SimMall) -> None:
    sim.faults.error_rate = 1.0


def _throttled(sim: SimMall) -> None:
    sim.faults.throttle_rate = 1.0
    sim.faults.retry_after = 7.0


# fault -> (how the simulator is told, the error every call must raise, its level)
FAULTS: dict[str, tuple[Callable[[SimMall], None], type[MallError], int]] = {
    "auth_rejected": (_auth_rejected, MallAuthError, LEVEL_CREDENTIAL),
    "maintenance": (_maintenance, MallUnavailable, LEVEL_TEMPORARY),
    "server_error": (_server_error, MallUnavailable, LEVEL_TEMPORARY),
    "throttled": (_throttled, MallRateLimited, LEVEL_TEMPORARY),
}


def _requests(sim: SimMall) -> int:
    return len(sim.requests)


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_mall_answers_map_onto_goqd_errors(
    store: Store, fault: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Auth rejected -> ``MallAuthError``; maintenance and 5xx -> ``MallUnavailable``;
    a throttle -> ``MallRateLimited`` with a wait a store can sleep. Every call that asks
    the mall raises exactly that, naming the mall and store and no secret; a call that
    asks nothing (an expiry read from the credential file) is unaffected."""
    spoil, expected, level = FAULTS[fault]
    with trio.fail_after(BOUND_S):
        await store.adapter.check_credentials()
        spoil(store.sim)
        for name in CALLS:
            before = _requests(store.sim)
            try:
                await call(store, name)
            except MallError as exc:
                error: MallError | None = exc
            else:
                error = None
            if error is None and name == "credential_expiry" and _requests(store.sim) == before:
                continue
            what = f"mall {store.mall!r}, {fault}: {name}"
            assert error is not None, f"{what} raised nothing"
            assert type(error) is expected, (
                f"{what} raised {type(error).__name__} ({error}), not {expected.__name__}"
            )
            assert error.level == level, f"{what}: level {error.level}, not {level}"
            assert (error.mall, error.store) == (store.mall, STORE), f"{what}: {error!r}"
            leaked = [s for s in store.secrets if s in str(error)]
            assert not leaked, f"{what}: the error shows a credential"
            if isinstance(error, MallRateLimited):
                wait = error.retry_after
                assert wait is not None and math.isfinite(wait), f"{what}: wait {wait}"
                assert 0 < wait <= RETRY_AFTER_CAP_S, f"{what}: wait {wait} out of bounds"


# The few answers of a mall that carry nothing a spoiled body could break: a status-only
# check is a valid ``check_credentials`` (a 200 proves the credential). A mall not named
# here must turn every spoiled body into a ``MallProtocolError``.
STATUS_ONLY: dict[tuple[str, str], frozenset[str]] = {
    # check_credentials proves the token with two calls whose answers it does not read.
    ("amazon", "check_credentials"): frozenset(MALFORMED),
    # orderCount: an empty or oddly typed ResultSet still proves the signed call worked.
    ("yahoo", "check_credentials"): frozenset({"missing_field", "wrong_type"}),
}


async def _every_call_refuses(store: Store, kind: str, phase: str) -> None:
    for name in CALLS:
        what = f"mall {store.mall!r}: {name} ({phase}) on a {kind} body"
        before = _requests(store.sim)
        try:
            await call(store, name)
        except MallProtocolError:
            continue
        except Exception as exc:
            pytest.fail(f"{what} raised {type(exc).__name__} ({exc}), not MallProtocolError")
        answers = [r.status for r in store.sim.requests[before:]]
        nothing_to_spoil = all(status == 204 for status in answers)
        assert nothing_to_spoil or kind in STATUS_ONLY.get((store.mall, name), ()), (
            f"{what} returned normally (answers {answers}); it must raise MallProtocolError"
        )


@pytest.mark.parametrize("kind", MALFORMED)
async def test_malformed_bodies_are_protocol_errors(
    store: Store, kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A 200 answer the mall's format does not allow is a ``MallProtocolError`` from
    every call that reads one, never another exception: on a fresh adapter (token and
    lookups not yet fetched) and on one that has already read them. A call answered
    without a body (a 204), or one that asks nothing, has nothing to spoil. Between the
    two, with the mall sound again, every call works: a bad body broke nothing."""
    with trio.fail_after(BOUND_S):
        store.sim.place_order([(store.key, 1)])
        await settle(store)
        store.sim.faults.malformed = kind
        await _every_call_refuses(store, kind, "fresh adapter")
        store.sim.faults.malformed = ""
        for name in CALLS:
            await call(store, name)
        store.sim.faults.malformed = kind
        await _every_call_refuses(store, kind, "adapter already in use")


# --------------------------------------------------------------------------------------
# The contract catches what a sixth mall lacks
# --------------------------------------------------------------------------------------


class _HalfAdapter:
    """An adapter a newcomer has only begun: no listings, no expiry."""

    mall = "kaimono"
    limits = MallLimits(push_batch=0, read_batch=100, min_poll_interval=60.0)

    def __init__(self, ctx: object) -> None:
        self.ctx = ctx

    async def check_credentials(self) -> None: ...

    async def fetch_orders(self, cursor: str | None) -> object: ...

    async def push_stock(self, items: Sequence[PushItem]) -> object: ...

    async def read_stock(self, listing_keys: Sequence[str]) -> object: ...


def _kaimono(**changes: Any) -> MallSpec:
    spec = MallSpec(
        name="kaimono",
        title="",
        open_adapter=_HalfAdapter,  # type: ignore[arg-type]
        limits=_HalfAdapter.limits,
        credential_fields=("api_key", "shop_id"),
        secret_fields=("api_key", "api_secret"),
    )
    return msgspec.structs.replace(spec, **changes)


async def test_contract_names_everything_a_new_mall_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(MALLS, "kaimono", _kaimono())
    with trio.fail_after(60):
        problems = await contract_problems("kaimono")
    spec = "mall 'kaimono': MallSpec in goqd/malls/kaimono.py"
    assert problems == [
        f"{spec} has no title (the name operators read, e.g. '楽天市場')",
        f"{spec} marks api_secret secret but names no such credential field",
        f"{spec}: limits.push_batch must be above 0, not 0",
        f"{spec} has no expiry (KeyExpiry: what the credential is called, where its expiry "
        "comes from and how an operator renews it)",
        f"{spec} has no default_live_statuses (the order statuses that hold stock)",
        f"{spec} has no default_cancel_statuses (the order statuses that give it back)",
        "mall 'kaimono' has no simulator: write goqd/sim/kaimono.py (a SimMall subclass) "
        "exporting SIM, a SimSpec for it",
        "mall 'kaimono': the adapter goqd/malls/registry.py opens lacks iter_listings, "
        "credential_expiry of MallAdapter (goqd/malls/base.py)",
        "mall 'kaimono' has no fixtures: put real-shaped answers of the mall under "
        "tests/fixtures/kaimono/",
        "mall 'kaimono' has no test file: write tests/malls/test_kaimono.py for what is "
        "particular to the mall",
    ]


async def test_contract_checks_the_simulator_and_expiry_against_the_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sixth mall copied from au PAY, simulator and all, and half edited: the contract
    sees that the simulator and the adapter are still au PAY's, that the simulator
    issues no credential the new spec requires and one it does not name, and that the
    expiry reads a field the credential file cannot hold and says nothing of renewal."""
    aupay = MALLS["aupay"]
    assert aupay.expiry is not None
    sixth = msgspec.structs.replace(
        aupay,
        name="kaimono",
        credential_fields=("api_key", "seller_code"),
        optional_fields=(),
        secret_fields=("api_key",),
        expiry=msgspec.structs.replace(aupay.expiry, field="issued_on", renewal="ask support"),
    )
    monkeypatch.setitem(MALLS, "kaimono", sixth)
    monkeypatch.setitem(SIMS, "kaimono", SIMS["aupay"])
    with trio.fail_after(60):
        problems = await contract_problems("kaimono")
    spec = "mall 'kaimono': MallSpec in goqd/malls/kaimono.py"
    assert problems == [
        f"{spec}: expiry.renewal does not end in how to install the new credential "
        "(`goqctl key set {store} --file new.json`)",
        f"{spec}: expiry.field 'issued_on' is not a credential field; add it to optional_fields",
        "mall 'kaimono': the SIM of goqd/sim/kaimono.py says it is mall 'aupay' and "
        "its class SimAupay sets mall = 'aupay'; both must be 'kaimono'",
        "mall 'kaimono': SimAupay.credentials() lacks seller_code, which "
        "MallSpec.credential_fields requires",
        "mall 'kaimono': SimAupay.credentials() issues issued_at, shop_id, which MallSpec "
        "names neither in credential_fields nor in optional_fields",
        "mall 'kaimono': the adapter goqd/malls/registry.py opens says its mall is 'aupay'",
        "mall 'kaimono' has no fixtures: put real-shaped answers of the mall under "
        "tests/fixtures/kaimono/",
        "mall 'kaimono' has no test file: write tests/malls/test_kaimono.py for what is "
        "particular to the mall",
    ]


async def test_a_mall_without_a_simulator_is_named_when_its_store_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(MALLS, "kaimono", _kaimono())
    with pytest.raises(pytest.fail.Exception) as info:
        async with open_store("kaimono"):
            pass
    assert str(info.value) == (
        "mall 'kaimono' has no simulator: write goqd/sim/kaimono.py exporting SIM"
    )
