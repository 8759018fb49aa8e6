"""The Prometheus export: counters and gauges read at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest

from forwarder.ops.metrics import Metrics, Stats


def test_metrics_read_the_counters_at_scrape_time() -> None:
    stats = Stats()
    metrics = Metrics(stats, lambda: {"queue_depth": ("Events waiting.", 3.0)})
    stats.accepted = 5
    stats.dead_lettered["gave_up"] += 2
    stats.refused["queue_full"] += 1
    metrics.latency.labels(account="default").observe(0.02)
    text = generate_latest(metrics.registry).decode()
    assert "forwarder_events_accepted_total 5.0" in text
    assert 'forwarder_events_dead_lettered_total{reason="gave_up"} 2.0' in text
    assert 'forwarder_events_dead_lettered_total{reason="rejected"} 0.0' in text
    assert 'forwarder_events_refused_total{reason="queue_full"} 1.0' in text
    assert "forwarder_queue_depth 3.0" in text
    assert 'forwarder_delivery_attempt_seconds_count{account="default"} 1.0' in text
