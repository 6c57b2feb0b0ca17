"""Every Prometheus metric goqd exports, defined once, on a registry the app passes in.

Each test builds its own ``CollectorRegistry``, so nothing here touches the global
default registry. Names carry the ``goqd_`` prefix and base units; labels are bounded
(``store``, ``mall``, ``outcome``, ``state``, ``level``, ``child``). Never add a SKU,
an order id or anything derived from a credential as a label: series would grow
without bound and ``/metrics`` would leak business data.

Metrics (``{labels}``):

=====================================================  =========  ==========================
name                                                   type       meaning
=====================================================  =========  ==========================
goqd_build_info{version}                               info       always 1
goqd_store_up{store,mall}                              gauge      1 while running/degraded
goqd_store_state{store,state}                          gauge      1 for the current state of
                                                                  running|degraded|stopped|
                                                                  paused|down, else 0
goqd_store_error_level{store}                          gauge      0, 8 or 9 (GoQSystem level)
goqd_poll_last_success_timestamp_seconds{store}        gauge      epoch s; 0 = never
goqd_push_last_success_timestamp_seconds{store}        gauge      epoch s; 0 = never
goqd_polls_total{store,outcome}                        counter    ok|unavailable|rate_limited|
                                                                  auth|protocol|error
goqd_poll_duration_seconds{store}                      histogram  one whole poll
goqd_order_lines_total{store,outcome}                  counter    booked|duplicate|stale|
                                                                  parked|rejected
goqd_pushes_total{store,outcome}                       counter    accepted|rejected|failed
goqd_outbox_pending{store}                             gauge      pushes waiting
goqd_parked_lines{store}                               gauge      lines with no listing yet
goqd_parked_listings{store}                            gauge      listings whose lines are
                                                                  parked, error still open
                                                                  (連携できない商品)
goqd_ambiguous_listings{store}                         gauge      listings marked 複数の商品が
                                                                  紐づいています (open error)
goqd_held_units{store}                                 gauge      sales seen on the mall's
                                                                  counter, orders not yet
goqd_errors_open{store,level}                          gauge      open errors per level
goqd_oversold_units_total                              counter    units sold below zero
goqd_ledger_batch_size                                 histogram  messages per transaction
goqd_ledger_commit_duration_seconds                    histogram  one transaction
goqd_ledger_inbox_waiting                              gauge      requests queued
goqd_supervisor_restarts_total{child}                  counter    restarts by supervise()
goqd_credential_expiry_timestamp_seconds{store}        gauge      epoch s; absent = unknown
goqd_mall_requests_total{store,mall,outcome}           counter    outcomes as polls_total
goqd_mall_clock_skew_seconds{store}                    gauge      the mall's clock minus
                                                                  goqd's (its responses'
                                                                  Date); 0 until measured
goqd_mall_request_retries_total{store}                 counter    reads sent again on a
                                                                  fresh connection (the
                                                                  pooled one was closed)
goqd_config_reloads_total{outcome}                     counter    reloads (SIGHUP): ok|refused
goqd_config_last_reload_successful                     gauge      0 after a refused reload
goqd_config_restart_needed_keys                        gauge      changed keys that wait for a
                                                                  restart
=====================================================  =========  ==========================

``touch_store`` creates every per-store series at start-up, so a dashboard or alert
sees a store (at 0) before its first poll. The one exception is the credential expiry,
which stays absent until known: a 0 there would read as "expired in 1970" and fire the
expiry alert for every store.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import goqd
from goqd.errors import LEVEL_CREDENTIAL, LEVEL_TEMPORARY

STATES = ("running", "degraded", "stopped", "paused", "down")
POLL_OUTCOMES = ("ok", "unavailable", "rate_limited", "auth", "protocol", "error")
LINE_OUTCOMES = ("booked", "duplicate", "stale", "parked", "rejected")
PUSH_OUTCOMES = ("accepted", "rejected", "failed")
ERROR_LEVELS = (str(LEVEL_TEMPORARY), str(LEVEL_CREDENTIAL))
RELOAD_OUTCOMES = ("ok", "refused")

_POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """All of goqd's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, version: str | None = None) -> None:
        r = registry
        self.info = Info("goqd_build", "goqd build information.", registry=r)
        self.info.info({"version": version or goqd.__version__})

        self.store_up = Gauge(
            "goqd_store_up",
            "1 if the store is syncing (running or degraded), else 0.",
            ["store", "mall"],
            registry=r,
        )
        self.store_state = Gauge(
            "goqd_store_state",
            "1 for the store's current state, 0 for the others.",
            ["store", "state"],
            registry=r,
        )
        self.store_error_level = Gauge(
            "goqd_store_error_level",
            "Highest open error level of the store (0, 8 or 9).",
            ["store"],
            registry=r,
        )
        self.poll_last_success_timestamp_seconds = Gauge(
            "goqd_poll_last_success_timestamp_seconds",
            "Unix time of the last successful order poll (0 = never).",
            ["store"],
            registry=r,
        )
        self.push_last_success_timestamp_seconds = Gauge(
            "goqd_push_last_success_timestamp_seconds",
            "Unix time of the last successful stock push (0 = never).",
            ["store"],
            registry=r,
        )
        self.polls_total = Counter(
            "goqd_polls",
            "Order polls by outcome.",
            ["store", "outcome"],
            registry=r,
        )
        self.poll_duration_seconds = Histogram(
            "goqd_poll_duration_seconds",
            "Duration of one order poll, all pages.",
            ["store"],
            buckets=_POLL_BUCKETS,
            registry=r,
        )
        self.order_lines_total = Counter(
            "goqd_order_lines",
            "Order lines handed to the ledger, by what it did with them.",
            ["store", "outcome"],
            registry=r,
        )
        self.pushes_total = Counter(
            "goqd_pushes",
            "Listing stock pushes by outcome.",
            ["store", "outcome"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "goqd_outbox_pending",
            "Stock pushes waiting in the outbox.",
            ["store"],
            registry=r,
        )
        self.parked_lines = Gauge(
            "goqd_parked_lines",
            "Order lines parked for want of a linked listing.",
            ["store"],
            registry=r,
        )
        self.parked_listings = Gauge(
            "goqd_parked_listings",
            "Listings with parked order lines whose listing_not_linked error is open: "
            "their sales lower no other store until they are linked.",
            ["store"],
            registry=r,
        )
        self.ambiguous_listings = Gauge(
            "goqd_ambiguous_listings",
            "Listings whose product has another listing in the same store (an open "
            "multiple_links error): their orders park and nothing is pushed to them.",
            ["store"],
            registry=r,
        )
        self.held_units = Gauge(
            "goqd_held_units",
            "Units held back from every store because this store's mall counter showed "
            "sales its order API has not shown yet (the sale watch).",
            ["store"],
            registry=r,
        )
        self.errors_open = Gauge(
            "goqd_errors_open",
            "Open errors by level.",
            ["store", "level"],
            registry=r,
        )
        self.oversold_units_total = Counter(
            "goqd_oversold_units",
            "Units booked beyond the available total stock.",
            registry=r,
        )
        self.ledger_batch_size = Histogram(
            "goqd_ledger_batch_size",
            "Ledger messages applied per transaction.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.ledger_commit_duration_seconds = Histogram(
            "goqd_ledger_commit_duration_seconds",
            "Duration of one ledger transaction.",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.ledger_inbox_waiting = Gauge(
            "goqd_ledger_inbox_waiting",
            "Requests waiting in the ledger inbox.",
            registry=r,
        )
        self.supervisor_restarts_total = Counter(
            "goqd_supervisor_restarts",
            "Restarts of a supervised child.",
            ["child"],
            registry=r,
        )
        self.credential_expiry_timestamp_seconds = Gauge(
            "goqd_credential_expiry_timestamp_seconds",
            "Unix time at which the store's credential expires.",
            ["store"],
            registry=r,
        )
        self.mall_requests_total = Counter(
            "goqd_mall_requests",
            "Requests to a mall API by outcome.",
            ["store", "mall", "outcome"],
            registry=r,
        )
        self.mall_clock_skew_seconds = Gauge(
            "goqd_mall_clock_skew_seconds",
            "The mall's clock minus goqd's, measured from the Date of its responses "
            "(positive: the mall is ahead).",
            ["store"],
            registry=r,
        )
        self.mall_request_retries_total = Counter(
            "goqd_mall_request_retries",
            "Idempotent reads sent again on a fresh connection because the pooled one "
            "had been closed by the mall.",
            ["store"],
            registry=r,
        )

        self.config_reloads_total = Counter(
            "goqd_config_reloads",
            "Configuration reloads (SIGHUP, systemctl reload) by outcome: ok, or refused "
            "(the file or a credential failed the start-up checks; nothing changed).",
            ["outcome"],
            registry=r,
        )
        for outcome in RELOAD_OUTCOMES:
            self.config_reloads_total.labels(outcome)
        self.config_last_reload_successful = Gauge(
            "goqd_config_last_reload_successful",
            "1 if the last reload was applied (or none was asked for), 0 if it was refused.",
            registry=r,
        )
        self.config_last_reload_successful.set(1)
        self.config_restart_needed_keys = Gauge(
            "goqd_config_restart_needed_keys",
            "Keys changed in the config file that take effect only when goqd is restarted.",
            registry=r,
        )

    def touch_store(self, store: str, mall: str) -> None:
        """Create every per-store series at 0 (see the module docstring)."""
        self.store_up.labels(store, mall).set(0)
        for state in STATES:
            self.store_state.labels(store, state).set(0)
        self.store_error_level.labels(store).set(0)
        self.poll_last_success_timestamp_seconds.labels(store)
        self.push_last_success_timestamp_seconds.labels(store)
        for outcome in POLL_OUTCOMES:
            self.polls_total.labels(store, outcome)
            self.mall_requests_total.labels(store, mall, outcome)
        self.poll_duration_seconds.labels(store)
        for outcome in LINE_OUTCOMES:
            self.order_lines_total.labels(store, outcome)
        for outcome in PUSH_OUTCOMES:
            self.pushes_total.labels(store, outcome)
        self.outbox_pending.labels(store)
        self.parked_lines.labels(store)
        self.parked_listings.labels(store)
        self.ambiguous_listings.labels(store)
        self.held_units.labels(store)
        for level in ERROR_LEVELS:
            self.errors_open.labels(store, level)
        self.mall_clock_skew_seconds.labels(store)
        self.mall_request_retries_total.labels(store)

    def touch_child(self, child: str) -> None:
        """Create ``goqd_supervisor_restarts_total{child}`` at 0."""
        self.supervisor_restarts_total.labels(child)

    def set_state(self, store: str, state: str) -> None:
        """Make ``state`` the store's one current state in ``goqd_store_state``."""
        if state not in STATES:
            raise ValueError(f"unknown store state {state!r}")
        for s in STATES:
            self.store_state.labels(store, s).set(1 if s == state else 0)

    def observe_ledger_batch(self, size: int, seconds: float, oversold: int) -> None:
        """One ledger transaction (``goqd.ledger.actor.LedgerMetrics``)."""
        self.ledger_batch_size.observe(size)
        self.ledger_commit_duration_seconds.observe(seconds)
        if oversold > 0:
            self.oversold_units_total.inc(oversold)

    def count_restart(self, child: str, error: Exception, restarts: int) -> None:
        """An ``on_restart`` callback for ``goqd.supervisor.supervise``."""
        self.supervisor_restarts_total.labels(child).inc()
