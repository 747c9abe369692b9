"""Hardware probes, the monitor thread and the Prometheus collectors. No Flask."""
