"""Networking and processes, one sub-package per job: dicom/ (receive and send), jobs/ (the
pipeline from a complete series to a sent one), web/ (the HTTP endpoint), cli/ (the commands),
process/ (sd_notify, child processes, logging); serve itself is supervisor.py."""
