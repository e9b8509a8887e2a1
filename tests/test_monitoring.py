"""monitoring/: the Grafana dashboard and the Prometheus alert rules (SPEC §8, issue 4).

The dashboard and the rules may only reference metrics shotsd exports. The promtool checks
need Debian's `prometheus` package; without it they skip with a visible reason, except under
CI (CI set in the environment), where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"

# What shotsd exports (SPEC §8, daemon/metrics.py). The histogram is the only metric whose
# series carry _bucket/_sum/_count suffixes.
HISTOGRAMS = {"shots_telegram_request_duration_seconds"}
EXPORTED = {
    "shots_messages_total",
    "shots_telegram_requests_total",
    "shots_rate_limited_total",
    "shots_jobs_finished_total",
    "shots_jobs_running",
    "shots_jobs_due",
    "shots_oldest_due_job_age_seconds",
    "shots_stale_jobs_reset_total",
    "shots_picker_last_tick_timestamp_seconds",
    *HISTOGRAMS,
}
EXPECTED_ALERTS = {
    "ShotsdDown",
    "ShotsdPickerStalled",
    "ShotsdStaleShotsReset",
    "ShotsdOldestDueShotTooOld",
    "ShotsdHighErrorRatio",
    "ShotsdSustained429",
    "ShotsdShotFailed",
}
METRIC_NAME = re.compile(r"\bshots_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# Grafana's variables, replaced by plausible values so the expressions parse as PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "6h",
    "$bot_slug": ".*",
    "$instance": ".*",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, histogram series mapped to their family."""
    names = set()
    for name in METRIC_NAME.findall(expr):
        family = HISTOGRAM_SUFFIX.sub("", name)
        names.add(family if family in HISTOGRAMS else name)
    return names


def test_metric_names_maps_only_histogram_suffixes() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(shots_telegram_request_duration_seconds_bucket"
        "[5m]))) + shots_telegram_request_duration_seconds_count + shots_messages_total"
        " + shots_jobs_running_count"
    )
    assert metric_names(expr) == {
        "shots_telegram_request_duration_seconds",
        "shots_messages_total",
        "shots_jobs_running_count",  # not a histogram: kept, so it is reported as unknown
    }


# --- dashboard ----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict)
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append((f"variable {variable['name']!r}",
                          query["query"] if isinstance(query, dict) else query))
    return exprs


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    bot = variables["bot_slug"]
    assert bot["type"] == "query"
    assert bot["query"]["query"] == "label_values(shots_messages_total, bot_slug)"

    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("title"), f"panel without a title: {panel}"
        if panel["type"] == "row":  # a row only groups panels; it has no query of its own
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no target"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"

    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("throughput", "outcomes", "429", "latency", "running / due",
                   "oldest due", "stale", "picker last tick"):
        assert needed in titles, f"no panel about {needed!r}"


def test_dashboard_references_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    seen: set[str] = set()
    for where, expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names <= EXPORTED, f"{where} uses unknown metrics {names - EXPORTED}: {expr}"
        seen |= names
    # every exported metric is on the dashboard somewhere
    assert seen == EXPORTED, f"not on the dashboard: {EXPORTED - seen}"


def test_dashboard_latency_quantiles() -> None:
    exprs = [expr for _, expr in dashboard_exprs(load_dashboard())]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e
            and "shots_telegram_request_duration_seconds_bucket" in e
            for e in exprs
        ), f"no p{quantile[2:]} latency"


# --- alert rules --------------------------------------------------------------------------
# PyYAML is not a dependency of shotsd, so the two YAML files (both written in this
# repository, in plain block style) are read with a small line-based reader; promtool parses
# them for real below.


def yaml_field(lines: list[str], key: str) -> str | None:
    """The value of the first `key:` in lines: inline, or a `|`/`>` block scalar (its lines
    joined with newlines). Quotes around an inline value are removed."""
    for i, line in enumerate(lines):
        match = re.match(rf"^(\s*)(?:- )?{re.escape(key)}:(?:\s+(.*))?$", line)
        if match is None:
            continue
        indent, value = len(match.group(1)), (match.group(2) or "").strip()
        if value[:1] in {"|", ">"}:
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            return "\n".join(block).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return value
    return None


def split_items(text: str, key: str) -> list[list[str]]:
    """The lines of each YAML list item that starts with `- key:`."""
    items: list[list[str]] = []
    for line in text.splitlines():
        if re.match(rf"^\s*- {re.escape(key)}:", line):
            items.append([])
        if items:
            items[-1].append(line)
    return items


def load_rules() -> list[dict[str, str | None]]:
    text = ALERTS.read_text(encoding="utf-8")
    assert re.findall(r"^\s*- name:\s*(\S+)", text, re.MULTILINE) == ["shotsd"]
    keys = ("alert", "expr", "for", "severity", "summary", "description")
    rules = [{key: yaml_field(item, key) for key in keys} for item in split_items(text, "alert")]
    assert rules, "no rules found"
    return rules


def test_yaml_field_reader() -> None:
    lines = ["  - alert: A", "    expr: |", "      up == 0", "      or", "      absent(up)",
             "    for: 3m", '    summary: "x y"']
    assert yaml_field(lines, "alert") == "A"
    assert yaml_field(lines, "expr") == "up == 0\nor\nabsent(up)"
    assert yaml_field(lines, "for") == "3m"
    assert yaml_field(lines, "summary") == "x y"
    assert yaml_field(lines, "labels") is None


def test_alert_rules_reference_only_exported_metrics() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    seen: set[str] = set()
    for rule in rules:
        expr = rule["expr"]
        assert expr, f"{rule['alert']} has no expr"
        names = metric_names(expr)
        assert names <= EXPORTED, f"{rule['alert']} uses unknown metrics {names - EXPORTED}"
        seen |= names
        # `up` is the only other series they may use, and only for the shotsd job
        for match in re.finditer(r"\bup\b(\{[^}]*\})?", expr):
            assert 'job="shotsd"' in (match.group(1) or ""), expr
        assert rule["severity"] in {"critical", "warning"}, rule
        assert rule["for"], f"{rule['alert']} has no `for:`"
        assert rule["summary"], rule
        assert rule["description"], rule
    assert seen == EXPORTED - {"shots_telegram_requests_total",
                               "shots_telegram_request_duration_seconds",
                               "shots_jobs_running", "shots_jobs_due"}


# --- promtool -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
            pytest.fail("promtool not installed, and CI must run these tests: "
                        "apt-get install prometheus")
        pytest.skip("promtool not installed: apt-get install prometheus")
    return path


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=120, check=False)


def test_promtool_check_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_tests_cover_every_alert() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for check in split_items(ALERTS_TEST.read_text(encoding="utf-8"), "eval_time"):
        name, expected = yaml_field(check, "alertname"), yaml_field(check, "exp_alerts")
        assert name, check
        (silent if expected == "[]" else firing).add(name)
    assert firing == EXPECTED_ALERTS, f"no firing test for {EXPECTED_ALERTS - firing}"
    assert silent == EXPECTED_ALERTS, f"no not-firing test for {EXPECTED_ALERTS - silent}"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses every dashboard query (wrapped as recording rules), with Grafana's
    variables replaced by plausible values."""
    rules = []
    for i, (_where, expr) in enumerate(dashboard_exprs(load_dashboard())):
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            expr = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr, re.DOTALL).group(1)
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "--lint=none", str(path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
