"""The Prometheus alert rules in config/prometheus/: promtool accepts them, their unit tests
pass, every alert is tested firing, and every metric and label they use is one goqd really
exports (so renaming a metric in goqd/metrics.py breaks this test, not a silent alert)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from goqd.metrics import Metrics
from tests.helpers.paths import ROOT

RULES_DIR = ROOT / "config" / "prometheus"
RULES = RULES_DIR / "goqd.rules.yml"
RULE_TESTS = RULES_DIR / "goqd.rules.test.yml"


# The conftest fixture: skipped without promtool, failed without it in CI.
needs_promtool = pytest.mark.usefixtures("promtool")

# Labels Prometheus adds to every scraped series; the rules join on them.
TARGET_LABELS = {"job", "instance"}
# PromQL words that look like names in a selector-free position.
_ALERT = re.compile(r"^\s*- alert: (\w+)\s*$", re.M)
_METRIC = re.compile(r"\bgoqd_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(goqd_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _unit_tests_against(rules: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool's unit tests of the shipped rules, run against ``rules`` instead."""
    (tmp_path / RULES.name).write_text(rules, encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)


def _exposition() -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets goqd exports for it, as a fresh daemon's /metrics
    shows them once a store is configured and has reported its credential expiry."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, version="0.0.0-test")
    metrics.touch_store("rakuten-main", "rakuten")
    metrics.touch_child("store:rakuten-main")
    # Absent until the mall reports it (goqd.metrics docstring); the store actor's expiry
    # loop sets it like this.
    metrics.credential_expiry_timestamp_seconds.labels("rakuten-main").set(1.8e9)
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def _alert_blocks(text: str) -> dict[str, str]:
    names = _ALERT.findall(text)
    parts = _ALERT.split(text)[1:]
    return {name: parts[i * 2 + 1] for i, name in enumerate(names)}


# -- promtool ---------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    # The unit tests must be able to fail: a store-stopped alert that never fires (level
    # 10 instead of 9, a state that does not exist) must not pass them.
    rules = RULES.read_text(encoding="utf-8")
    broken = rules.replace("goqd_store_error_level >= 9", "goqd_store_error_level >= 10")
    broken = broken.replace(
        'max by (job, instance, store) (goqd_store_state{state="stopped"} == 1)',
        'max by (job, instance, store) (goqd_store_state{state="no-such-state"} == 1)',
    )
    assert broken.count("no-such-state") == 1
    result = _unit_tests_against(broken, tmp_path)
    assert result.returncode != 0
    assert "GoqdStoreStopped" in result.stdout + result.stderr


# -- coverage of the unit tests ---------------------------------------------------------


def test_every_alert_is_unit_tested_firing_and_some_not_firing() -> None:
    alerts = _ALERT.findall(RULES.read_text(encoding="utf-8"))
    assert len(alerts) == len(set(alerts)) >= 8
    tests = RULE_TESTS.read_text(encoding="utf-8")
    for alert in alerts:
        fired = re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        assert fired, f"{alert} has no promtool test in which it fires"
    quiet = re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests)
    assert set(quiet) >= {
        "GoqdStoreStopped",
        "GoqdPollsStale",
        "GoqdOutboxGrowing",
        "GoqdOrderLinesParked",
        "GoqdAmbiguousListings",
        "GoqdConfigReloadRefused",
    }


def test_every_alert_has_severity_and_says_what_to_do_in_english_and_japanese() -> None:
    blocks = _alert_blocks(RULES.read_text(encoding="utf-8"))
    assert blocks
    japanese = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
    for name, block in blocks.items():
        assert re.search(r"severity: (critical|warning)\n", block), name
        summary = re.search(r"summary: (.*)", block)
        description = block.partition("description: >-")[2]
        assert summary and description.strip(), name
        text = summary.group(1) + description
        assert japanese.search(text), f"{name}: no Japanese operator term"
        # The next step is a command the operator can run.
        assert re.search(r"`(goqctl|goqd|systemctl|journalctl) [^`]+`", description), name


def test_level_9_alert_names_the_key_renewal_command() -> None:
    block = _alert_blocks(RULES.read_text(encoding="utf-8"))["GoqdStoreStopped"]
    assert "エラーレベル9: goqctl key set STORE" in block
    assert "goqctl key set {{ $labels.store }}" in block


# -- the rules speak goqd's real metrics ------------------------------------------------


def _unexported(text: str, exported: dict[str, list[dict[str, str]]]) -> list[str]:
    return sorted(set(_METRIC.findall(text)) - exported.keys())


def test_every_metric_in_the_rules_and_their_tests_is_exported_by_goqd() -> None:
    exported = _exposition()
    for path in (RULES, RULE_TESTS):
        text = path.read_text(encoding="utf-8")
        assert _METRIC.search(text), path
        missing = _unexported(text, exported)
        assert not missing, f"{path.name} uses metrics goqd does not export: {missing}"
    # And the check sees a rename: the rules as they would read after one.
    renamed = RULES.read_text(encoding="utf-8").replace(
        "goqd_outbox_pending", "goqd_outbox_pending_pushes"
    )
    assert _unexported(renamed, exported) == ["goqd_outbox_pending_pushes"]


def test_every_label_in_the_rules_is_one_goqd_exports_with_those_values() -> None:
    exported = _exposition()
    text = RULES.read_text(encoding="utf-8")
    all_labels = {k for sets in exported.values() for s in sets for k in s} | TARGET_LABELS
    selectors = _SELECTOR.findall(text)
    assert selectors
    for metric, body in selectors:
        for label, op, value in _MATCHER.findall(body):
            have = {s[label] for s in exported[metric] if label in s}
            assert have, f"{metric} has no label {label!r}"
            wanted = value.split("|") if op == "=~" else [value]
            for v in wanted:
                assert v in have, f'{metric}{{{label}{op}"{value}"}}: no series with {v!r}'
    for group in _GROUPING.findall(text):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in all_labels, f"rules group or join on unknown label {label!r}"
    # The test series carry goqd's labels too, or they would test nothing real.
    tests = RULE_TESTS.read_text(encoding="utf-8")
    for metric, body in _SELECTOR.findall(tests):
        names = {label for label, _, _ in _MATCHER.findall(body)} - TARGET_LABELS
        known = {k for s in exported[metric] for k in s}
        assert names <= known, f"test series {metric} has labels goqd does not export"


# -- the clock-skew alert ------------------------------------------------------------------


def test_clock_skew_alert_fires_at_the_default_store_limit() -> None:
    # The rule cannot read the config: its threshold is the default clock-skew-limit, and
    # a change to one without the other would alert on a skew goqd accepts (or not on one
    # it refuses).
    from goqd.config import StoreConfig

    limit = StoreConfig(name="s", mall="rakuten", base_url="http://x", credentials="c")
    block = _alert_blocks(RULES.read_text(encoding="utf-8"))["GoqdMallClockSkew"]
    threshold = re.search(r"abs\(goqd_mall_clock_skew_seconds\) > (\d+)", block)
    assert threshold is not None
    assert float(threshold.group(1)) == limit.clock_skew_seconds == 60.0
    quiet = re.findall(
        r"alertname: GoqdMallClockSkew\n\s+exp_alerts: \[\]",
        RULE_TESTS.read_text(encoding="utf-8"),
    )
    assert quiet, "no promtool test shows a small or short skew staying quiet"


@needs_promtool
def test_promtool_unit_tests_fail_when_the_clock_skew_alert_is_broken(tmp_path: Path) -> None:
    # An alert that needs an hour of skew would miss the nine hours of a zone read wrong
    # for the first hour; the unit tests must see it.
    rules = RULES.read_text(encoding="utf-8")
    broken = rules.replace(
        "abs(goqd_mall_clock_skew_seconds) > 60", "abs(goqd_mall_clock_skew_seconds) > 86400"
    )
    assert broken != rules
    result = _unit_tests_against(broken, tmp_path)
    assert result.returncode != 0
    assert "GoqdMallClockSkew" in result.stdout + result.stderr
