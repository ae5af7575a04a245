"""Every shipped PromQL query is right with one scraped process or many.

The store's gauges (queue depth, oldest age, dead-letter depth, destinations, webhook
endpoints) are read from the store, so serve and every worker on one PostgreSQL report the same
numbers: a query takes their ``max`` per series before anything else, never a ``sum`` across
processes (a serve and a worker showed a queue of 1 / 4 as 2 / 8). Counters are each process's
own and are summed. Checked on the alert rules, the Grafana dashboard and the PromQL in
docs/observability.md: by reading each query, and (where promtool is installed) by evaluating
the dashboard's queries on one process and on three reporting the same store."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postlane.alerts import load_rules
from postlane.metrics import Metrics
from tests.deploy.support import DEPLOY, IN_CI, ROOT, load_yaml, run

#: gauges read from the store: the same in every process on one store
STORE_GAUGES = (
    "postlane_queue_depth",
    "postlane_oldest_message_age_seconds",
    "postlane_dead_letter_depth",
    "postlane_recipients",
    "postlane_destination_rate",
    "postlane_destination_paused",
    "postlane_destination_misconfigured",
    "postlane_destination_in_flight",
    "postlane_webhook_consecutive_failures",
    "postlane_webhook_endpoint_paused",
    "postlane_webhook_lag_seconds",
)
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
#: aggregations that give the store's number whatever the number of processes reporting it
SAME_FROM_ANY_NUMBER = {"max", "min"}
DASHBOARD = DEPLOY / "grafana" / "postlane-dashboard.json"
OBSERVABILITY = ROOT / "docs" / "observability.md"
GAUGE = re.compile(r"\b(" + "|".join(STORE_GAUGES) + r")\b(?![a-z_])")


def _matching_parens(expr: str) -> dict[int, int]:
    pairs, stack = {}, []
    for i, char in enumerate(expr):
        if char == "(":
            stack.append(i)
        elif char == ")":
            pairs[stack.pop()] = i
    assert not stack, f"unbalanced: {expr}"
    return pairs


def _caller(expr: str, opening: int, pairs: dict[int, int]) -> tuple[str, str]:
    """The function or aggregation whose argument list opens at ``opening``, and its grouping
    (``by (...)``/``without (...)`` written before or after the arguments, or "")."""
    before = expr[:opening].rstrip()
    grouping = ""
    if before.endswith(")"):  # `max by (lane) (...)`: skip the grouping to reach the name
        close = len(before) - 1
        start = next(o for o, c in pairs.items() if c == close)
        keyword = re.search(r"(by|without)\s*$", expr[:start])
        if keyword is None:
            return "", ""  # plain parentheses after an expression
        grouping = keyword.group(1) + " " + expr[start : close + 1]
        before = expr[: keyword.start()].rstrip()
    name = re.search(r"([a-z_]+)$", before)
    after = re.match(r"\s*(by|without)\s*(\([^)]*\))", expr[pairs[opening] + 1 :])
    if after and not grouping:
        grouping = f"{after.group(1)} {after.group(2)}"
    return (name.group(1) if name else ""), grouping


def fleet_mistakes(expr: str) -> list[str]:
    """Each store gauge in ``expr`` not first aggregated with max (or min) per series: summed
    or averaged across processes, or not aggregated at all (one series per process)."""
    pairs = _matching_parens(expr)
    mistakes = []
    for found in GAUGE.finditer(expr):
        enclosing = sorted(
            (o for o, c in pairs.items() if o < found.start() < c), reverse=True
        )  # innermost first
        for opening in enclosing:
            name, grouping = _caller(expr, opening, pairs)
            if name in AGGREGATIONS:
                if name not in SAME_FROM_ANY_NUMBER:
                    mistakes.append(f"{found.group(1)} is aggregated with {name} first")
                elif grouping.startswith("without") or re.search(r"\b(instance|pod)\b", grouping):
                    mistakes.append(f"{found.group(1)} is kept per process ({grouping})")
                break
        else:
            mistakes.append(f"{found.group(1)} is not aggregated: one series per process")
    return mistakes


def rule_queries() -> Iterator[tuple[str, str]]:
    for rule in load_rules():
        yield f"alerts.toml {rule.name}", rule.expr
    shipped = load_yaml(DEPLOY / "prometheus" / "postlane.rules.yml")
    for group in shipped["groups"]:
        for rule in group["rules"]:
            yield f"postlane.rules.yml {rule['alert']}", rule["expr"]


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield f"{panel['title']} {target['refId']}", target


def docs_queries() -> Iterator[tuple[str, str]]:
    """The page's PromQL, one query at a time (but those it shows as wrong, ``# wrong``)."""
    text = OBSERVABILITY.read_text()
    for block in re.findall(r"```promql\n(.*?)```", text, re.S):
        query = ""
        for whole in block.splitlines():
            line, _, comment = whole.partition("#")
            line = line.rstrip()
            if not line or comment.strip().startswith("wrong"):
                continue
            if line.startswith(" ") and query:  # a query continued on the next line
                query += " " + line.strip()
                continue
            if query:
                yield "observability.md", query
            query = line
        if query:
            yield "observability.md", query


def shipped_queries() -> list[tuple[str, str]]:
    dashboard = [(where, target["expr"]) for where, target in dashboard_targets()]
    return [*rule_queries(), *dashboard, *docs_queries()]


def test_the_store_gauges_listed_here_are_postlanes_gauges() -> None:
    text = asyncio.run(Metrics().exposition()).decode()
    for name in STORE_GAUGES:
        assert f"# TYPE {name} gauge" in text, name


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (lane) (postlane_queue_depth{state=~"queued|deferred|sending"})',
        'sum(postlane_queue_depth{state=~"queued|deferred|sending"}) > 0',
        "postlane_dead_letter_depth",
        "min_over_time(postlane_destination_paused[30m]) == 1",
        "avg by (lane) (postlane_oldest_message_age_seconds)",
        "max by (lane, instance) (postlane_oldest_message_age_seconds)",
        "max without (lane) (postlane_oldest_message_age_seconds)",
        "sum(postlane_webhook_lag_seconds) by (endpoint)",
    ],
)
def test_the_check_finds_a_store_gauge_summed_or_kept_per_process(expr: str) -> None:
    assert fleet_mistakes(expr)


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (lane) (max by (lane, state) (postlane_queue_depth{state=~"queued"}))',
        "max(postlane_dead_letter_depth)",
        "max by (lane) (deriv(postlane_oldest_message_age_seconds[15m])) > 0.5",
        "max(postlane_webhook_lag_seconds) by (endpoint)",
        "sum by (class) (rate(postlane_delivery_attempts_total[5m]))",  # a counter: summed
        'min_over_time(sum(max by (lane, state) (postlane_queue_depth{state="queued"}))[15m:1m])',
    ],
)
def test_the_check_accepts_a_store_gauge_taken_once(expr: str) -> None:
    assert fleet_mistakes(expr) == []


def test_no_shipped_query_adds_up_the_store_gauges_of_several_processes() -> None:
    queries = shipped_queries()
    assert len(queries) > 20  # the rules, the dashboard, the docs: all read
    assert any(where == "observability.md" for where, _ in queries)
    mistakes = [
        f"{where}: {mistake}: {expr}" for where, expr in queries for mistake in fleet_mistakes(expr)
    ]
    assert mistakes == []


#: what each dashboard query on a store gauge shows for the store below, whatever the number of
#: processes reporting it
DASHBOARD_EXPECTED = {
    "Queue depth by lane A": [('{lane="high"}', 1), ('{lane="normal"}', 4), ('{lane="low"}', 0)],
    "Oldest waiting message by lane A": [
        ('{lane="high"}', 30),
        ('{lane="normal"}', 600),
        ('{lane="low"}', 0),
    ],
    "Dead letters B": [("{}", 12)],
    "Destination rate allowed A": [('{destination="google"}', 5)],
    "Paused destinations A": [('{destination="slow.example"}', 1)],
}
STORE = {
    'postlane_queue_depth{lane="high",state="queued"}': 1,
    'postlane_queue_depth{lane="normal",state="queued"}': 3,
    'postlane_queue_depth{lane="normal",state="deferred"}': 1,
    'postlane_queue_depth{lane="normal",state="held"}': 7,  # held: not waiting to be sent
    'postlane_queue_depth{lane="low",state="queued"}': 0,
    'postlane_oldest_message_age_seconds{lane="high"}': 30,
    'postlane_oldest_message_age_seconds{lane="normal"}': 600,
    'postlane_oldest_message_age_seconds{lane="low"}': 0,
    "postlane_dead_letter_depth": 12,
    'postlane_destination_rate{destination="google"}': 5,
    'postlane_destination_rate{destination="relay"}': "+Inf",
    'postlane_destination_paused{destination="slow.example"}': 1,
    'postlane_destination_paused{destination="google"}': 0,
}


def _series(name: str, instance: str) -> str:
    if "{" in name:
        return name.replace("}", f',instance="{instance}"}}', 1)
    return f'{name}{{instance="{instance}"}}'


def test_every_dashboard_query_on_a_store_gauge_has_an_expectation() -> None:
    on_store = {where for where, target in dashboard_targets() if GAUGE.search(target["expr"])}
    assert on_store == set(DASHBOARD_EXPECTED)


@pytest.mark.parametrize("processes", [1, 3])
def test_the_dashboard_shows_the_store_once_whatever_the_number_of_processes(
    tmp_path: Path, processes: int
) -> None:
    """A serve and two workers on one store show the queue as one does (promtool evaluates
    the dashboard's own queries)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool is not installed in CI")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    instances = ["serve:8025", *(f"worker-{n}:9025" for n in range(1, processes))]
    exprs = {where: target["expr"] for where, target in dashboard_targets()}
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": _series(name, instance), "values": f"{value} {value} {value}"}
                    for name, value in STORE.items()
                    for instance in instances
                ],
                "promql_expr_test": [
                    {
                        "expr": exprs[where],
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": labels, "value": value} for labels, value in expected
                        ],
                    }
                    for where, expected in DASHBOARD_EXPECTED.items()
                ],
            }
        ],
    }
    (tmp_path / "dashboard.test.yml").write_text(json.dumps(test, indent=1))
    result = run([promtool, "test", "rules", "dashboard.test.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
