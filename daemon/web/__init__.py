"""The HTTP endpoint: endpoint.py serves app.py (the WSGI application) with server.py's limits;
the probes (/healthz, /readyz), /metrics, and the status pages (overview, jobs, a series with
before/after pictures, pages.py and the modules it uses)."""
