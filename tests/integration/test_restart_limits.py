"""Mall rate limits across restarts, and pacing from the mall's side of the wire.

* A restarted store starts its rate buckets where the killed process left them (its
  state file, ``goqd.stores.state``): a restart loop of the real daemon, in process
  under a ``MockClock``, never draws a 429 from the strict simulators of all five malls,
  and the credential-expiry question is never asked at start-up.
* ``TokenBucket.slot`` counts a call when its answer arrives: Amazon patches sent over a
  connection whose first request is slow (connection set-up) never arrive faster than
  the usage plan allows.
* The state file itself: what makes its records untrustworthy (a torn record, another
  boot) starts every bucket empty; a Retry-After outlives the process; a damaged file
  never stops the store.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from goqd.malls.amazon import AmazonAdapter
from goqd.malls.base import StoreContext
from goqd.malls.ratelimit import TokenBucket, shared_bucket
from goqd.malls.shopify import ShopifyAdapter
from goqd.messages import ListingAttrs, PushItem
from goqd.secret import Secret
from goqd.sim.amazon import SimAmazon
from goqd.sim.shopify import SimShopify
from goqd.stores import actor, state
from goqd.stores.state import open_store_state, state_path
from tests.helpers import rig

EPOCH = 1_717_200_000.0


def wall() -> float:
    return EPOCH + trio.current_time()


# --------------------------------------------------------------------------- the bucket


async def test_a_slot_spends_its_token_when_the_answer_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    async with bucket.slot():
        await trio.sleep(0.5)  # the call is out for half a second
    start = trio.current_time()
    await bucket.acquire()
    # A full second after the answer, not after the send.
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_calls_out_together_never_overdraw_the_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    sent: list[float] = []

    async def call() -> None:
        async with bucket.slot():
            sent.append(trio.current_time())
            await trio.sleep(3.0)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
    # Two tokens: two calls at once; the third waits for an answer plus a token's time.
    assert sent[:2] == [0.0, 0.0]
    assert sent[2] == pytest.approx(4.0)


class _ColdConnection(httpx.AsyncBaseTransport):
    """The wire between goqd and the simulator: a request after a second of silence
    opens a new connection and reaches the mall ``setup`` seconds late; every request
    and answer is also late by up to 5 ms."""

    def __init__(self, inner: httpx.AsyncBaseTransport, rng: random.Random, setup: float):
        self.inner = inner
        self.rng = rng
        self.setup = setup
        self.last = -1e9

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        cold = trio.current_time() - self.last > 1.0
        await trio.sleep((self.setup if cold else 0.0) + self.rng.uniform(0, 0.005))
        response = await self.inner.handle_async_request(request)
        await trio.sleep(self.rng.uniform(0, 0.005))
        self.last = trio.current_time()
        return response


@pytest.mark.parametrize("setup", [0.03, 0.1])
async def test_amazon_patches_never_arrive_faster_than_the_plan(
    autojump_clock: trio.testing.MockClock, setup: float
) -> None:
    """Batches of six patches, each after a pause, so the first of each goes over a new
    connection. Paced from the send, the sixth arrived inside the 200 ms that the plan
    (5 per second, burst 5) needs for six: 429 (issue: six patches within 184 ms)."""
    sim = SimAmazon(shop_id="A2SELLERJP0001", clock=wall)
    keys = [f"SKU-{i:02d}" for i in range(60)]
    for key in keys:
        sim.add_listing(key, quantity=5)
    host = "am.sim.invalid"
    wire = _ColdConnection(rig.SimRouter({host: sim.app}), random.Random(7), setup)
    async with httpx.AsyncClient(transport=wire) as http:
        base = f"http://{host}"
        adapter = AmazonAdapter(
            StoreContext(
                store="am",
                mall="amazon",
                base_url=base,
                credentials={k: Secret(v) for k, v in sim.credentials().items()},
                http=http,
                clock=wall,
                urls={"lwa": base},
            )
        )
        items = [
            PushItem(listing_key=k, sku=k, quantity=3, version=1, attrs=ListingAttrs())
            for k in keys
        ]
        with trio.fail_after(600):
            for start in range(0, len(items), 6):
                outcomes = await adapter.push_stock(items[start : start + 6])
                assert all(o.accepted for o in outcomes)
                await trio.sleep(2.0)
    patches = [r for r in sim.requests if r.api == "patchListingsItem"]
    assert len(patches) == 60
    assert sim.throttled_requests == 0


class _Jitter(httpx.AsyncBaseTransport):
    """Every request and every answer late by up to ``most`` seconds, independently:
    requests overtake each other on the way, and so do answers."""

    def __init__(self, inner: httpx.AsyncBaseTransport, rng: random.Random, most: float):
        self.inner = inner
        self.rng = rng
        self.most = most

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await trio.sleep(self.rng.uniform(0, self.most))
        response = await self.inner.handle_async_request(request)
        await trio.sleep(self.rng.uniform(0, self.most))
        return response


@pytest.mark.parametrize("seed", [0, 2, 3])
async def test_shopify_answers_out_of_order_never_overdraw_the_cost_bucket(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """A poll and two watch-like readers share the store's cost bucket over a wire that
    reorders. An answer carrying the shop's level from before another request arrived
    used to wipe that request's points off the local bucket: THROTTLED."""
    sim = SimShopify(shop_id="tokyo", clock=wall)
    keys = [sim.add_variant(f"SKU-{i}", 5).listing_key for i in range(30)]
    rng = random.Random(seed)
    host = "sh.sim.invalid"
    async with httpx.AsyncClient(
        transport=_Jitter(rig.SimRouter({host: sim.app}), rng, 0.05)
    ) as http:
        adapter = ShopifyAdapter(
            StoreContext(
                store="sh",
                mall="shopify",
                base_url=f"http://{host}",
                credentials={k: Secret(v) for k, v in sim.credentials().items()},
                http=http,
                clock=wall,
                options={"default_location_id": sim.primary_location},
            )
        )

        async def poll() -> None:
            cursor = None
            for _ in range(40):
                cursor = (await adapter.fetch_orders(cursor)).cursor

        async def read() -> None:
            for _ in range(200):
                await adapter.read_stock(rng.sample(keys, 10))
                await trio.sleep(rng.uniform(0, 0.3))

        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                nursery.start_soon(read)
                nursery.start_soon(read)
    assert len(sim.requests) == 440
    assert sim.throttled_requests == 0


# ----------------------------------------------------------------------- the state file


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path)


async def _seconds_to_a_token(bucket: TokenBucket) -> float:
    """How long ``bucket`` makes the next call wait."""
    start = trio.current_time()
    await bucket.acquire()
    return trio.current_time() - start


async def test_a_spent_bucket_is_still_spent_after_a_restart(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    first = open_store_state(state_dir, "ra")
    bucket = shared_bucket(first.limiters(wall), "search", 1.0, 1.0)
    await bucket.acquire()
    # "Killed" right here: the next process reads the file the first one left.
    second = open_store_state(state_dir, "ra")
    assert second.trusted
    again = shared_bucket(second.limiters(wall), "search", 1.0, 1.0)
    assert await _seconds_to_a_token(again) == pytest.approx(1.0)


async def test_a_call_out_when_the_process_died_counts_as_spent_at_the_restart(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    first = open_store_state(state_dir, "am")
    bucket = shared_bucket(first.limiters(wall), "patch", 1.0, 1.0)
    snapshot: bytes = b""
    async with bucket.slot():
        # SIGKILL with the call out: what the file holds at this instant is all a new
        # process will ever know.
        snapshot = Path(first.path).read_bytes()
    await trio.sleep(30)  # long after: had the call been forgotten, the bucket were full
    Path(first.path).write_bytes(snapshot)
    again = shared_bucket(open_store_state(state_dir, "am").limiters(wall), "patch", 1.0, 1.0)
    assert await _seconds_to_a_token(again) == pytest.approx(1.0)


async def test_a_retry_after_outlives_the_process(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    first = open_store_state(state_dir, "ya")
    bucket = shared_bucket(first.limiters(wall), "orderList", 0.9, 1.0)
    await bucket.acquire()
    bucket.block_for(60.0)  # Yahoo locked the URL out for a minute
    await trio.sleep(5)
    again = shared_bucket(open_store_state(state_dir, "ya").limiters(wall), "orderList", 0.9, 1.0)
    assert await _seconds_to_a_token(again) == pytest.approx(55.0, abs=0.01)


async def test_after_a_reboot_every_bucket_starts_empty(
    autojump_clock: trio.testing.MockClock, state_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "boot_id", lambda: "boot-1")
    first = open_store_state(state_dir, "am")
    shared_bucket(first.limiters(wall), "getOrders", 1 / 60, 20.0)  # full, never used
    # A power loss may have lost the newest records: nothing in the file is believed.
    monkeypatch.setattr(state, "boot_id", lambda: "boot-2")
    second = open_store_state(state_dir, "am")
    assert not second.trusted
    limiters = second.limiters(wall)
    for name in ("getOrders", "never-used"):
        bucket = shared_bucket(limiters, name, 1.0, 5.0)
        assert await _seconds_to_a_token(bucket) == pytest.approx(1.0), name
    # What this boot writes is trusted again.
    assert open_store_state(state_dir, "am").trusted


async def test_a_torn_record_starts_every_bucket_empty_and_keeps_the_whole_ones(
    autojump_clock: trio.testing.MockClock, state_dir: str
) -> None:
    first = open_store_state(state_dir, "ya")
    first.adapter().put("order/1", b"kept")
    await shared_bucket(first.limiters(wall), "orderInfo", 1.0, 1.0).acquire()
    path = first.path
    with open(path, "ab") as f:
        f.write(b"\x00\x01\x02")  # a record cut short
    second = open_store_state(state_dir, "ya")
    assert not second.trusted
    assert second.adapter().get("order/1") == b"kept"
    bucket = shared_bucket(second.limiters(wall), "setStock", 1.0, 1.0)
    assert await _seconds_to_a_token(bucket) == pytest.approx(1.0)


@pytest.mark.parametrize("content", [b"", b"not a state file", os.urandom(300)])
def test_an_unreadable_state_file_is_set_aside_and_never_stops_the_store(
    state_dir: str, content: bytes
) -> None:
    path = state_path(state_dir, "sh")
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(content)
    opened = open_store_state(state_dir, "sh")
    assert not opened.trusted
    assert opened.adapter().keys() == []
    opened.adapter().put("k", b"v")
    assert open_store_state(state_dir, "sh").adapter().get("k") == b"v"


def test_the_state_file_is_rewritten_without_dead_records_as_it_grows(state_dir: str) -> None:
    opened = open_store_state(state_dir, "am")
    view = opened.adapter()
    for n in range(3000):
        view.put("order/x", b"%d" % n + b"." * 500)
    size = os.path.getsize(opened.path)
    assert size < 2 * state.COMPACT_AT + 600
    assert open_store_state(state_dir, "am").adapter().get("order/x") == b"2999" + b"." * 500


def test_a_state_file_that_cannot_be_written_leaves_the_store_running(state_dir: str) -> None:
    opened = open_store_state(state_dir, "ra")
    os.remove(opened.path)
    os.mkdir(opened.path)  # not writable as a file, whoever runs the test
    view = opened.adapter()
    with capture_logs() as logs:
        view.put("order/1", b"x")  # logged once, not raised
        view.put("order/2", b"y")
        assert (view.get("order/1"), view.get("order/2")) == (b"x", b"y")
        os.rmdir(opened.path)
        view.put("order/3", b"z")  # the file is back: written whole again
    assert [e["event"] for e in logs] == ["state_write_failed", "state_write_recovered"]
    reopened = open_store_state(state_dir, "ra").adapter()
    assert sorted(reopened.keys()) == ["order/1", "order/2", "order/3"]


async def test_a_full_disk_leaves_no_partial_copy_and_no_bucket_record_believed_after(
    autojump_clock: trio.testing.MockClock, state_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_store_state(state_dir, "ra")
    bucket = shared_bucket(first.limiters(wall), "search", 1.0, 1.0)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with capture_logs() as logs:
        monkeypatch.setattr(os, "write", disk_full)
        await bucket.acquire()  # its record cannot be appended
        await bucket.acquire()  # nor can the file be rewritten
        monkeypatch.undo()
    assert [e["event"] for e in logs] == ["state_write_failed"]
    assert os.listdir(os.path.dirname(first.path)) == ["ra.state"]
    # Killed here: the file lacks the tokens spent, so it must not be believed.
    second = open_store_state(state_dir, "ra")
    assert not second.trusted
    again = shared_bucket(second.limiters(wall), "search", 1.0, 1.0)
    assert await _seconds_to_a_token(again) == pytest.approx(1.0)


def test_a_state_directory_that_cannot_be_made_never_stops_the_store(state_dir: str) -> None:
    Path(state_dir, "stores").write_bytes(b"")  # a file where the directory should be
    view = open_store_state(state_dir, "ra").adapter()
    view.put("order/1", b"x")
    assert view.get("order/1") == b"x"


# ------------------------------------------------------------ a restart loop of the daemon

FLEET = (
    ("ra", "rakuten"),
    ("ya", "yahoo"),
    ("au", "aupay"),
    ("sh", "shopify"),
    ("am", "amazon"),
)


def _throttled(fleet: rig.Fleet) -> dict[str, list[str]]:
    """Every 429 each simulator answered, as "api@seconds" (nothing here injects one)."""
    return {
        store: [f"{r.api}@{r.at - rig.EPOCH:.2f}" for r in sim.requests if r.status == 429]
        for store, sim in fleet.sims.items()
    }


def test_a_restart_loop_never_goes_over_any_malls_rate() -> None:
    """The daemon is killed 12 times at random moments of its first seconds (orders
    arriving all the while) and started again at once; the simulators, which enforce
    every documented rate on arrival, answer no request with a 429. The state files are
    taken as they were at the moment of each kill, so nothing written on the way out
    helps. With every bucket starting full and every loop at once, this run drew ten:
    Rakuten searchOrder, license expiry and bulk upsert, au PAY searchStocks, each
    within a second of a start."""
    tmp = tempfile.mkdtemp(prefix="gq-restarts-", dir=rig._fast_tmp())
    starts: list[float] = []

    async def main() -> None:
        fleet = rig.build_fleet(FLEET, clock=rig.mock_wall_clock, seed=5)
        router, urls = rig.router_for(fleet)
        rng = random.Random(5)
        market = fleet.market(rng)
        stores_dir = os.path.join(tmp, "state", "stores")
        for n in range(13):
            last = n == 12
            async with rig.open_daemon(
                fleet,
                tmp,
                urls,
                transport=router,
                clock=rig.mock_wall_clock,
                seed=n,
                seed_ledger=n == 0,
                watch_interval="5s",
                push_retry="2s",
            ):
                starts.append(trio.current_time())
                for _ in range(3):
                    market.place_random(rig.mock_wall_clock())
                await trio.sleep(1200.0 if last else rng.uniform(0.0, 6.0))
                files = {path: path.read_bytes() for path in Path(stores_dir).glob("*.state")}
            if not last:
                # SIGKILL leaves exactly what was in the files at that instant.
                for path, blob in files.items():
                    path.write_bytes(blob)
        assert _throttled(fleet) == {store: [] for store in fleet.sims}
        # The license expiry is asked, but never in a store's first minutes.
        license_calls = [
            r.at - rig.EPOCH for r in fleet.sims["ra"].requests if r.api == "license.expiryDate.get"
        ]
        assert len(license_calls) == 1
        assert license_calls[0] - starts[-1] >= actor.EXPIRY_START_S[0]

    try:
        with rig.inline_threads(), rig.ordered_deadlines(), rig.deterministic_scheduling(5):
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
