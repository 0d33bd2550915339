"""Networking and processes: SCP, completion, worker loop, SCU, CLI, metrics."""
