"""The status pages served beside /metrics: overview, jobs, and a series with before/after
pictures. Nothing here is imported by the rest of the node except through ``pages``."""
