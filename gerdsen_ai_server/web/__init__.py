"""Cross-cutting Flask/WSGI layers: the error envelope, security, the Host/Origin guard, the request log, graceful shutdown."""
