"""The status pages: routes, views and rendering (Jinja2 with autoescaping, no scripts).

Each view reads the database in one short session (SQLite sessions take the write lock) and
renders outside it. Replays go through daemon.jobs.queries.replay, as `denoised-node replay` does;
approving and rejecting a held job through daemon.jobs.queries.review, as `jobs approve|reject` do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy import select

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.job_status import AttemptLimits, job_status
from denoised_node.daemon.jobs.queries import AdminError, replay, review, status_summary
from denoised_node.daemon.web import formatting
from denoised_node.daemon.web.activity import STAGE_LABELS, last_hour, recent_jobs
from denoised_node.daemon.web.charts import day_charts
from denoised_node.daemon.web.csrf import TOKEN_FIELD, CsrfTokens
from denoised_node.daemon.web.health_rows import (
    ConfigState,
    HealthRow,
    SlowChecks,
    config_row,
    slow_checks,
)
from denoised_node.daemon.web.preview_cache import RETRY_SECONDS, PreviewCache
from denoised_node.daemon.web.previews import KINDS
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.request import Request, Response
from denoised_node.daemon.web.series_data import (
    NotFound,
    find_series_uid,
    load_series_page,
    read_header,
)
from denoised_node.storage.db import SessionFactory
from denoised_node.storage.files import FileStore
from denoised_node.storage.models import Job, utcnow
from denoised_node.storage.queue import JobState

log = logging.getLogger(__name__)

View = Callable[..., Response]
STATIC = {"style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    view: str  # a method of StatusPages


ROUTES = (
    Route("GET", re.compile(r"/"), "overview"),
    Route("GET", re.compile(r"/jobs"), "jobs"),
    Route("GET", re.compile(r"/jobs/(?P<job_id>[0-9]{1,18})"), "job"),
    Route("GET", re.compile(r"/jobs/(?P<job_id>[0-9]{1,18})/(?P<kind>before|after|residual)\.png"),
          "image"),
    Route("POST", re.compile(r"/jobs/(?P<job_id>[0-9]{1,18})/replay"), "replay"),
    Route("POST", re.compile(r"/jobs/(?P<job_id>[0-9]{1,18})/(?P<verdict>approve|reject)"),
          "review"),
    Route("GET", re.compile(r"/series/(?P<series_uid>[0-9.]{1,64})"), "series"),
    Route("GET", re.compile(r"/static/(?P<name>style\.css|favicon\.svg)"), "static"),
    Route("GET", re.compile(r"/favicon\.ico"), "favicon"),
)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("denoised_node.daemon.web", "templates"),
                      autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(when=formatting.when, duration=formatting.duration, ago=formatting.ago,
                       short_uid=formatting.short_uid, figure=formatting.figure,
                       sop_name=formatting.sop_name)
    return env


class StatusPages:
    """``handle(request) -> Response`` for every path that is not /metrics or a probe."""

    def __init__(self, settings: Settings, sessions: SessionFactory, store: FileStore,
                 readiness: Readiness, *, slow: SlowChecks | None = None,
                 previews: PreviewCache | None = None, csrf: CsrfTokens | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 config_state: ConfigState | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.readiness = readiness
        self._own_slow = slow is None
        self.slow = slow if slow is not None else slow_checks(settings)
        self.config_state = config_state  # serve's: shown as the "config" health row
        self.previews = previews or PreviewCache(settings.gate)
        self.csrf = csrf or CsrfTokens()
        self.clock = clock
        self.env = _environment()
        folder = files("denoised_node.daemon.web") / "static"
        self.static_files = {name: (folder / name).read_bytes() for name in STATIC}

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        allowed = []
        for route in ROUTES:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if route.method != request.method:
                allowed.append(route.method)
                continue
            view: View = getattr(self, route.view)
            try:
                return view(request, **match.groupdict())
            except AdminError as exc:  # NotFound included
                return self._message(404, "Not found", str(exc))
            except Exception:  # one broken page must not look like a dead node
                log.exception("status page failed", extra={"path": request.path})
                return self._message(500, "Error", "This page failed; the node's log says why.")
        if allowed:
            return Response(405, b"method not allowed\n", "text/plain; charset=utf-8",
                            (("Allow", ", ".join(sorted(set(allowed)))),))
        return self._message(404, "Not found", f"Nothing at {request.path}. Try the overview, "
                             "/metrics, /healthz or /readyz.")

    def _render(self, template: str, status: int = 200, **context: Any) -> Response:
        now, limits = self.clock(), AttemptLimits.from_settings(self.settings)
        page = self.env.get_template(template).render(
            ae_title=self.settings.node.ae_title, csrf_field=TOKEN_FIELD,
            csrf_token=self.csrf.issue(), stage_labels=STAGE_LABELS, now=now,
            job_status=lambda job: job_status(job, now, limits), **context)
        return Response(status, page.encode("utf-8"))

    def _message(self, status: int, title: str, message: str, **links: str) -> Response:
        return self._render("message.html", status, title=title, message=message,
                            links=links or {"Overview": "/", "Jobs": "/jobs"})

    # -- views ----------------------------------------------------------------------------
    def reconfigure(self, settings: Settings) -> None:
        """A reloaded config: its destinations checked, its gate limits on new previews."""
        self.settings = settings
        if self._own_slow:
            self.slow = slow_checks(settings)
        self.previews.gate = settings.gate

    def overview(self, request: Request) -> Response:
        now = self.clock()
        _, checks = self.readiness.report()
        with self.sessions() as session:
            summary = status_summary(session, now)
            hour = last_hour(session, now)
            charts = day_charts(session, now)
            failed = recent_jobs(session, states=[JobState.FAILED.value], limit=5)
            latest_model = session.scalar(select(Job.model_identity).where(
                Job.model_identity.is_not(None)).order_by(Job.id.desc()).limit(1))
        health = [HealthRow(name, c["ok"], c["detail"]) for name, c in checks.items()]
        if self.config_state is not None:
            health.append(config_row(self.config_state))
        # ?wait=1 waits for the slow checks (scripts, screenshots); a person never waits.
        health += self.slow.rows(wait=20.0 if request.arg("wait") == "1" else 0.0)
        return self._render("overview.html", active="overview", health=health,
                            summary=summary, hour=hour, failed=failed, charts=charts,
                            latest_model=latest_model)

    def jobs(self, request: Request) -> Response:
        states = [s.value for s in JobState]
        state = request.arg("state")
        with self.sessions() as session:
            counts = status_summary(session)["jobs"]
            rows = recent_jobs(session, states=[state] if state in states else None, limit=100)
        return self._render("jobs.html", active="jobs", rows=rows, states=states,
                            state=state if state in states else "", counts=counts)

    def job(self, request: Request, job_id: str) -> Response:
        with self.sessions() as session:
            uid = find_series_uid(session, int(job_id))
        return Response.redirect(f"/series/{uid}?job={int(job_id)}")

    def series(self, request: Request, series_uid: str) -> Response:
        job_id = _int(request.arg("job"))
        with self.sessions() as session:
            page = load_series_page(session, self.store, series_uid, job_id)
        preview = header = None
        if page.preview is not None:
            preview = self.previews.get(page.preview, _int(request.arg("stack")) or 0)
            header = read_header(page.preview.source_paths,
                                 self.settings.http.show_patient_data)
        return self._render("series.html", active="jobs", page=page, preview=preview,
                            header=header or {}, kinds=KINDS, retry_seconds=RETRY_SECONDS,
                            gate_enabled=self.settings.gate.enabled,
                            show_patient_data=self.settings.http.show_patient_data)

    def image(self, request: Request, job_id: str, kind: str) -> Response:
        with self.sessions() as session:
            uid = find_series_uid(session, int(job_id))
            page = load_series_page(session, self.store, uid, int(job_id))
        if page.preview is None:
            raise NotFound(f"the files of series {uid} were purged")
        preview = self.previews.get(page.preview, _int(request.arg("stack")) or 0)
        if preview.pending:
            return Response(503, b"the picture is being made; try again\n",
                            "text/plain; charset=utf-8", (("Retry-After", str(RETRY_SECONDS)),))
        if kind not in preview.images:
            raise NotFound(f"no {kind} picture for job {job_id}")
        return Response(200, preview.images[kind], "image/png", cache="private, max-age=60")

    def replay(self, request: Request, job_id: str) -> Response:
        problem = self.csrf.problem(request.form_value(TOKEN_FIELD), request.headers)
        if problem:
            return self._message(403, "Not replayed", problem)
        who = "web" if request.user is None else f"web:{request.user}"
        with self.sessions.begin() as session:
            (outcome,) = replay(session, job_id=int(job_id), who=who)
            uid = find_series_uid(session, int(job_id))
        log.info("replay from the status page: %s", outcome.message,
                 extra={"job_id": outcome.job_id, "requeued": outcome.requeued, "user": who})
        title = "Queued again" if outcome.requeued else "Not replayed"
        return self._message(200 if outcome.requeued else 409, title, outcome.message,
                             **{"This series": f"/series/{uid}?job={int(job_id)}",
                                "Jobs": "/jobs", "Overview": "/"})

    def review(self, request: Request, job_id: str, verdict: str) -> Response:
        problem = self.csrf.problem(request.form_value(TOKEN_FIELD), request.headers)
        if problem:
            return self._message(403, "Not done", problem)
        who = "web" if request.user is None else f"web:{request.user}"
        with self.sessions.begin() as session:
            uid = find_series_uid(session, int(job_id))
            try:
                message = review(session, int(job_id), approve=verdict == "approve", who=who)
            except AdminError as exc:
                return self._message(409, "Not done", str(exc),
                                     **{"This series": f"/series/{uid}?job={int(job_id)}"})
        log.info("held job %s from the status page", "approved" if verdict == "approve"
                 else "rejected", extra={"job_id": int(job_id), "user": who})
        return self._message(200, "Approved" if verdict == "approve" else "Rejected", message,
                             **{"This series": f"/series/{uid}?job={int(job_id)}",
                                "Jobs": "/jobs", "Overview": "/"})

    def static(self, request: Request, name: str) -> Response:
        return Response(200, self.static_files[name], STATIC[name], cache="max-age=3600")

    def favicon(self, request: Request) -> Response:
        return Response(200, self.static_files["favicon.svg"], STATIC["favicon.svg"],
                        cache="max-age=86400")


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 19 else None
