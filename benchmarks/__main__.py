"""`python -m benchmarks`: run the sections and print one table (Markdown)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import (
    DEFAULT_WORKDIR,
    Row,
    cpu_hogs,
    format_table,
    fsync_latency_ms,
    series_folder,
)

SECTIONS = ("receive", "send", "dicomweb", "inference", "e2e", "soak", "idle", "adversarial")
# The soak and the adversarial run only when asked: they take their time whatever the machine.
DEFAULT_SECTIONS = ("receive", "send", "inference", "e2e")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _run_sections(args: argparse.Namespace, chosen: list[str], rows: list[Row]) -> None:
    if "receive" in chosen or "send" in chosen:
        from benchmarks.dicom_io import receive_rows, send_rows, tool_versions

        print(f"peers: {tool_versions()}", file=sys.stderr)
        series = series_folder(args.workdir, args.slices)
        suffix = ", busy (a CPU hog per core beside)" if args.busy else ""
        with cpu_hogs((os.cpu_count() or 1) if args.busy else 0):
            if "receive" in chosen:
                rows += receive_rows(series, args.workdir, suffix)
            if "send" in chosen:
                rows += send_rows(series, args.workdir, suffix)
    if "dicomweb" in chosen:  # STOW-RS against DIMSE: 128 slices unless --slices says
        from benchmarks.dicomweb_send import dicomweb_receive_rows, dicomweb_rows

        series = series_folder(args.workdir, args.dicomweb_slices)
        rows += dicomweb_rows(series, args.workdir, runs=args.dicomweb_runs)
        rows += dicomweb_receive_rows(series, args.workdir, runs=max(1, args.dicomweb_runs // 2))
    if "inference" in chosen:
        from benchmarks.inference import inference_rows

        rows += inference_rows(device=args.device)
    if "e2e" in chosen:
        from benchmarks.end_to_end import end_to_end_rows

        rows += end_to_end_rows(args.workdir)
    if "idle" in chosen:
        from benchmarks.idle import idle_rows

        rows += idle_rows(args.workdir, seconds=args.idle_seconds)
    if "soak" in chosen:
        from benchmarks.soak import SoakPlan, soak_rows

        attackers = {"slow_loris": 0, "http_flood": 0} if args.soak_no_attack else {}
        rows += soak_rows(args.workdir, SoakPlan(seconds=args.soak_seconds, **attackers))
    if "adversarial" in chosen:
        from benchmarks.adversarial import AdversarialPlan, adversarial_rows

        plan = AdversarialPlan.quick() if args.adversarial_quick else AdversarialPlan()
        rows += adversarial_rows(args.workdir, plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)} "
                             f"(default: {', '.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--slices", type=int, default=500, help="series size for receive/send")
    parser.add_argument("--dicomweb-slices", type=int, default=128,
                        help="series size for the dicomweb section (the issue's 128)")
    parser.add_argument("--dicomweb-runs", type=int, default=5,
                        help="runs of each transport in the dicomweb section (median)")
    parser.add_argument("--device", default="cpu", help="inference device: cpu, cuda, auto")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="how long each idle process is watched (idle section)")
    parser.add_argument("--soak-seconds", type=float, default=60.0,
                        help="how long the soak section attacks and sends")
    parser.add_argument("--soak-no-attack", action="store_true",
                        help="the soak's senders and probes alone: the figures to compare with")
    parser.add_argument("--adversarial-quick", action="store_true",
                        help="the adversarial section at tiny sizes (a smoke test, not figures)")
    parser.add_argument("--busy", action="store_true",
                        help="receive and send with a CPU hog per core beside (a busy machine)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    os.environ.setdefault("TCP_NODELAY", "1")

    rows: list[Row] = []
    started = time.time()
    failed = False
    try:
        _run_sections(args, chosen, rows)
    except Exception as exc:  # noqa: BLE001 - still print what was measured before
        print(f"benchmark stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        failed = True
    table = format_table(rows)
    fsync_ms = fsync_latency_ms(args.workdir / "fsync-probe")
    load = os.getloadavg()[0]
    header = (f"Machine: {machine()}. {time.strftime('%Y-%m-%d')}, "
              f"{time.time() - started:.0f} s; write+fsync of 128 KiB: {fsync_ms:.2f} ms; "
              f"load average {load:.1f}.")
    print(header)
    print(table)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
