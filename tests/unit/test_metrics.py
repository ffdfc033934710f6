"""/metrics: prometheus-client's exposition of the gateway's counters, under the names dashboards use."""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.messages import TunnelStats
from services.gatewayd.main import StateCollector, metric_families


def scrape(tunnels, counters, peers) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: metric_families(tunnels, counters, peers)))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metric_names_labels_and_values():
    tunnel = TunnelStats(node_id="b" * 16, lane="tcp", bytes_in=10, bytes_out=2048)
    samples = scrape([tunnel], {"served": 3, "failed": 1}, 2)
    assert samples[("mesh_tunnel_bytes_total", (("direction", "out"), ("lane", "tcp"), ("peer", "b" * 16)))] == 2048
    assert samples[("mesh_tunnel_bytes_total", (("direction", "in"), ("lane", "tcp"), ("peer", "b" * 16)))] == 10
    assert samples[("mesh_requests_total", (("result", "served"),))] == 3
    assert samples[("mesh_requests_total", (("result", "failed"),))] == 1
    assert samples[("mesh_peers", ())] == 2


def test_values_are_read_at_scrape_time():
    counters = {"served": 0, "failed": 0}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: metric_families([], counters, 0)))
    counters["served"] = 7
    assert 'mesh_requests_total{result="served"} 7.0' in generate_latest(registry).decode()
