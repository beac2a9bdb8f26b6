"""Processes: the coordinator process, the API server, the Ray pool, the embedded stack."""
