"""Rewrites the shipped Envoy config for a fleet on this machine (used by tests/fleet.rs).

Only what must differ on one machine changes: the listener and admin ports, the cluster's
endpoints (STATIC 127.0.0.1 ports instead of the Kubernetes headless service's DNS name) and
the active health check's interval. Every timeout, retry, balancing and outlier setting is the
shipped one.

usage: envoy_local.py SRC DST LISTEN_PORT ADMIN_PORT HEALTH_INTERVAL_MS REPLICA_PORT...
"""
import sys

import yaml


def main() -> None:
    src, dst, listen_port, admin_port, interval_ms, *replicas = sys.argv[1:]
    with open(src) as f:
        cfg = yaml.safe_load(f)
    cfg["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": int(admin_port),
    }
    listeners = [l for l in cfg["static_resources"]["listeners"] if l["name"] == "grpc"]
    clusters = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "stepstream"]
    if len(listeners) != 1 or len(clusters) != 1:
        sys.exit("expected one listener named grpc and one cluster named stepstream")
    listeners[0]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": int(listen_port),
    }
    cluster = clusters[0]
    cluster["type"] = "STATIC"
    for dns_only in ("dns_lookup_family", "dns_refresh_rate", "respect_dns_ttl", "dns_failure_refresh_rate"):
        cluster.pop(dns_only, None)
    cluster["load_assignment"] = {
        "cluster_name": "stepstream",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {"address": "127.0.0.1", "port_value": int(p)}
                            }
                        }
                    }
                    for p in replicas
                ]
            }
        ],
    }
    check = cluster["health_checks"][0]
    check["interval"] = f"{int(interval_ms) / 1000:.3f}s"
    check["timeout"] = f"{int(interval_ms) / 1000:.3f}s"
    check.pop("no_traffic_interval", None)
    check["no_traffic_interval"] = check["interval"]
    with open(dst, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


if __name__ == "__main__":
    main()
