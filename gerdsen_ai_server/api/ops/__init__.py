"""Operations routes: health probes, Prometheus metrics, the API's description, the dashboard's files."""
