"""The eventaudit Grafana dashboard, defined with grafana-foundation-sdk (Grafana 11.6 schema).

Every panel's query is also run against a real Prometheus in tests/integration/test_live.py.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, VizLegendOptions
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
)

UID = "eventaudit-completion"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Alert levels (prometheus/alerts.yml): warning below 99 %, critical below 95 %.
COMPLETION_WARNING = 0.99
COMPLETION_CRITICAL = 0.95

SELECTOR = 'topic=~"$topic", subscription=~"$subscription", window="$window"'


def _one(selector: str) -> str:
    """Every exporter replica serves every topic's numbers: one series per topic, whichever
    replicas are scraped (never a sum that grows with the replica count)."""
    return f"max without(instance, pod) ({selector})"


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _completion_thresholds() -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps(
            [
                model.Threshold(value=None, color="red"),
                model.Threshold(value=COMPLETION_CRITICAL, color="orange"),
                model.Threshold(value=COMPLETION_WARNING, color="green"),
            ]
        )
    )


def _series(
    title: str, description: str, unit: str, *targets: prometheus.Dataquery
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def _variables() -> list[cogbuilder.Builder[model.VariableModel]]:
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        db.QueryVariable("topic")
        .label("Topic")
        .datasource(DATASOURCE)
        .query("label_values(eventaudit_published_events, topic)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
        db.QueryVariable("subscription")
        .label("Subscription")
        .datasource(DATASOURCE)
        .query('label_values(eventaudit_completion_rate{topic=~"$topic"}, subscription)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
        db.QueryVariable("window")
        .label("Window")
        .datasource(DATASOURCE)
        .query("label_values(eventaudit_completion_rate, window)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .current(model.VariableOption(selected=True, text="5m", value="5m")),
    ]


def build() -> db.Dashboard:
    """The dashboard builder."""
    completion = _one(f"eventaudit_completion_rate{{{SELECTOR}}}")
    return (
        db.Dashboard("eventaudit: Pub/Sub delivery completion")
        .uid(UID)
        .description("Did every published event reach every subscription? Settled buckets only.")
        .tags(["eventaudit", "pubsub"])
        .refresh("30s")
        .time("now-3h", "now")
        .variables(_variables())
        .with_row(db.Row("Completion"))
        .with_panel(
            _series(
                "Completion rate per subscription",
                "Received / published over the selected window, evaluated after the settle delay. "
                "Gaps mean no events were published (NaN), not 100 %.",
                "percentunit",
                _query(completion, "{{topic}} / {{subscription}}"),
            )
            .min(0)
            .max(1)
            .thresholds(_completion_thresholds())
            .thresholds_style(
                GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE_AND_AREA)
            )
        )
        .with_panel(
            stat.Panel()
            .title("Current completion")
            .description("Latest completion rate per subscription over the selected window.")
            .datasource(DATASOURCE)
            .unit("percentunit")
            .decimals(2)
            .height(8)
            .span(12)
            .thresholds(_completion_thresholds())
            .no_value("no traffic")
            .with_target(_query(completion, "{{subscription}}").instant())
        )
        .with_panel(
            _series(
                "Missed events: lost and dead-lettered",
                "Expected events with no receipt on the subscription, over the window: those "
                "Pub/Sub moved to the subscription's dead-letter topic, and the rest (lost). "
                "List them, each with its fate: GET /api/v1/missed?topic=...&subscription=...",
                "short",
                _query(
                    f"{_one(f'eventaudit_missed_events{{{SELECTOR}}}')} - "
                    f"{_one(f'eventaudit_dead_lettered_events{{{SELECTOR}}}')}",
                    "lost {{topic}} / {{subscription}}",
                    "A",
                ),
                _query(
                    _one(f"eventaudit_dead_lettered_events{{{SELECTOR}}}"),
                    "dead-lettered {{topic}} / {{subscription}}",
                    "B",
                ),
            ).min(0)
        )
        .with_panel(
            _series(
                "Published vs received per second",
                "From the 1m window: settled events published per second, and received per "
                "second on each subscription (recording rules in prometheus/rules.yml).",
                "ops",
                _query(
                    'eventaudit:published_events:rate1m{topic=~"$topic"}',
                    "published {{topic}}",
                    "A",
                ),
                _query(
                    'eventaudit:received_events:rate1m{topic=~"$topic", '
                    'subscription=~"$subscription"}',
                    "received {{subscription}}",
                    "B",
                ),
            ).min(0)
        )
        .with_row(db.Row("Delivery"))
        .with_panel(
            _series(
                "Delivery latency p50 / p95 / p99",
                "publishTime (publisher clock) to receipt (subscriber clock), per subscription.",
                "s",
                *(
                    _query(
                        f'eventaudit:delivery_latency_seconds:p{q}{{subscription=~"$subscription"}}',
                        f"p{q} {{{{subscription}}}}",
                        ref,
                    )
                    for q, ref in (("50", "A"), ("95", "B"), ("99", "C"))
                ),
            ).min(0)
        )
        .with_panel(
            _series(
                "Duplicates, unmatched and filtered-out receipts",
                "Duplicates: deliveries beyond the first (redeliveries, seeks). Unmatched: "
                "receipts whose event has no publish record (a publisher that lost its records). "
                "Filtered out: receipts of events the subscription's filter excludes (Pub/Sub "
                "never sends them; the emulator does not enforce filters).",
                "short",
                _query(
                    _one(f"eventaudit_duplicate_deliveries{{{SELECTOR}}}"),
                    "duplicates {{subscription}}",
                    "A",
                ),
                _query(
                    _one(f"eventaudit_unmatched_receipts{{{SELECTOR}}}"),
                    "unmatched {{subscription}}",
                    "B",
                ),
                _query(
                    _one(f"eventaudit_filtered_receipts{{{SELECTOR}}}"),
                    "filtered out {{subscription}}",
                    "C",
                ),
            ).min(0)
        )
        .with_row(db.Row("Exporter health"))
        .with_panel(
            stat.Panel()
            .title("Exporter up")
            .description(
                "1 when the last evaluation succeeded; 0 means the numbers above are stale."
            )
            .datasource(DATASOURCE)
            .height(6)
            .span(8)
            .with_target(_query("eventaudit_up", "{{instance}}").instant())
        )
        .with_panel(
            _series(
                "Evaluation duration",
                "Time taken by each evaluation of newly settled buckets.",
                "s",
                _query("eventaudit_evaluation_duration_seconds", "{{instance}}"),
            )
            .span(8)
            .height(6)
        )
        .with_panel(
            _series(
                "Age of the last evaluation",
                "Seconds since the last successful evaluation; grows while evaluations fail.",
                "s",
                _query("time() - eventaudit_last_evaluation_timestamp_seconds", "{{instance}}"),
            )
            .span(8)
            .height(6)
        )
        .with_panel(
            stat.Panel()
            .title("Subscriptions not audited")
            .description(
                "Subscriptions whose filter eventaudit cannot evaluate: not reported at all "
                "(alert EventAuditFilterUnsupported names them). 0 is the healthy value."
            )
            .datasource(DATASOURCE)
            .height(6)
            .span(8)
            .with_target(
                _query(
                    "count(max without(instance, pod) (eventaudit_subscription_filter_unsupported)"
                    " == 1) or vector(0)",
                    "not audited",
                ).instant()
            )
        )
        .with_panel(
            _series(
                "Topics evaluated per exporter replica",
                "Topic leases each replica holds: the work is split evenly (within one topic) "
                "and moves to the others within the lease time when a replica dies.",
                "short",
                _query("eventaudit_topic_leases_held", "{{instance}}"),
            )
            .span(8)
            .height(6)
        )
        .with_panel(
            stat.Panel()
            .title("Topics without an owner")
            .description(
                "Topics no live exporter replica evaluates (alert EventAuditTopicWithoutOwner). "
                "0 is the healthy value; during a failover it is non-zero for up to the lease "
                "time."
            )
            .datasource(DATASOURCE)
            .height(6)
            .span(8)
            .with_target(
                _query("min(eventaudit_topics_without_owner) or vector(0)", "no owner").instant()
            )
        )
        .with_panel(
            stat.Panel()
            .title("Writes refused by fencing")
            .description(
                "Writes an exporter replica did not make because its lease had passed to "
                "another (it was paused or partitioned): counted, never written. Non-zero "
                "after a pause is expected; steadily growing means lease time is too short."
            )
            .datasource(DATASOURCE)
            .height(6)
            .span(8)
            .with_target(
                _query(
                    "sum(increase(eventaudit_lease_fenced_writes_total[1h])) or vector(0)",
                    "refused (1h)",
                ).instant()
            )
        )
    )
