"""The job pipeline: completion, rules, the worker loop (claim -> denoise -> derive -> send),
the models it keeps, notifications, and the job queries the CLI and the pages share."""
