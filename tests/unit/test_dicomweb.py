"""DICOMweb without a peer: the multipart reader and writer, the status mapping both ways, the
destination config, and the STOW-RS receiver through the HTTP application (no socket)."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from denoised_node.config.settings import (
    ConfigError,
    DicomwebDestination,
    Settings,
    load_settings,
)
from denoised_node.daemon.dicom.dimse_status import Status
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicomweb import multipart
from denoised_node.daemon.dicomweb.client import Instance, StowResponse, batches
from denoised_node.daemon.dicomweb.multipart import MediaType, MultipartError, MultipartReader
from denoised_node.daemon.dicomweb.status import answer_for, verdict_for
from denoised_node.daemon.web.app import HttpApp
from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.daemon.web.stow import StowReceiver, source_of
from denoised_node.storage.models import Instance as InstanceRow
from denoised_node.storage.models import Series
from denoised_node.storage.runtime import Runtime
from tests.fixtures.wsgi import call

MR = "1.2.840.10008.5.1.4.1.1.4"


# --- multipart ---------------------------------------------------------------------------------

def _body(parts: list[bytes], boundary: str = "b0undary", *, close: bool = True,
          preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def _read_all(body: bytes, boundary: str = "b0undary") -> tuple[list[bytes], list[bool]]:
    reader = MultipartReader(io.BytesIO(body), boundary, len(body))
    parts, whole = [], []
    while (head := reader.next_part()) is not None:
        chunks: list[bytes] = []
        whole.append(reader.read_part(chunks.append))
        parts.append(b"".join(chunks))
        assert head.media_type.essence == "application/dicom"
        if not whole[-1]:
            break
    return parts, whole


def test_multipart_round_trip_through_the_writer(tmp_path: Path) -> None:
    contents = [b"", b"x", b"\r\n--b0undar" * 1000, bytes(range(256)) * 9000]
    files = []
    for n, content in enumerate(contents):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(content)
        files.append((path, len(content)))
    boundary = multipart.new_boundary()
    sent: list[bytes] = []
    multipart.write_body(sent.append, boundary, files)
    body = b"".join(sent)
    assert len(body) == multipart.body_length(boundary, [size for _, size in files])
    parts, whole = _read_all(body, boundary)
    assert parts == contents and all(whole)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_multipart_reader_finds_delimiters_across_chunks(monkeypatch, chunk: int) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(multipart, "CHUNK", chunk)
    contents = [b"a" * 50, b"--b0undary" + b"b" * 30, b"c\r\n--b0undar"]
    parts, whole = _read_all(_body(contents, preamble=b"a preamble\r\n"))
    assert parts == contents and whole == [True, True, True]


def test_multipart_body_cut_short_says_so() -> None:
    body = _body([b"first", b"second part that is cut"], close=False)[:-12]
    parts, whole = _read_all(body)
    assert parts[0] == b"first" and whole == [True, False]


def test_multipart_without_the_boundary_is_an_error() -> None:
    reader = MultipartReader(io.BytesIO(b"just some bytes"), "b0undary")
    with pytest.raises(MultipartError, match="never occurs"):
        reader.next_part()


def test_media_type_parameters() -> None:
    media = MediaType.parse('Multipart/Related; type="application/dicom"; boundary="a b;c"')
    assert media.essence == "multipart/related"
    assert media.parameters == {"type": "application/dicom", "boundary": "a b;c"}


# --- status mapping ----------------------------------------------------------------------------

def test_receiver_answers() -> None:
    assert answer_for(3, 0) == 200
    assert answer_for(2, 1) == 202
    assert answer_for(0, 2) == 409
    assert answer_for(0, 0) == 400


@pytest.mark.parametrize(("status", "reasons", "permanent"), [
    (400, [], True), (401, [], True), (403, [], True), (404, [], True), (413, [], True),
    (409, [0xC000], True), (409, [], False), (409, [0xA700], False),
    (202, [0xC000], False), (200, [], False), (500, [], False), (503, [], False),
    (408, [], False), (429, [], False)])
def test_sending_verdicts(status: int, reasons: list[int], permanent: bool) -> None:
    verdict = verdict_for(status, reasons)
    assert verdict.permanent is permanent
    assert bool(verdict.fix) is permanent


def test_stow_response_read_per_instance() -> None:
    body = json.dumps({
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]},
                                            "00081196": {"vr": "US", "Value": [0xB000]}}]},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.4"]},
                                            "00081197": {"vr": "US", "Value": [0xA700]}}]},
    }).encode()
    answer = StowResponse.parse(body)
    assert answer.stored == {"1.2.3": 0xB000} and answer.failed == {"1.2.4": 0xA700}
    assert StowResponse.parse(b"") == StowResponse({}, {})


def test_batches_are_bounded_in_bytes() -> None:
    instances = [Instance(Path(f"{n}"), size, str(n)) for n, size in enumerate([5, 5, 20, 1, 1])]
    assert [[i.size for i in b] for b in batches(instances, 10)] == [[5, 5], [20], [1, 1]]


# --- config ------------------------------------------------------------------------------------

def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_a_dicomweb_destination(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[[destinations]]\nname = "web"\nkind = "dicomweb"\n'
                               'url = "http://127.0.0.1:8042/dicom-web/"\n')
    (web,) = settings.destinations
    assert isinstance(web, DicomwebDestination) and web.url == "http://127.0.0.1:8042/dicom-web"


@pytest.mark.parametrize(("text", "message"), [
    ('kind = "dicomweb"\nurl = "http://h/dw"\nae_title = "PACS"',
     'destinations.0: ae_title belongs to kind = "dimse" destinations only'),
    ('ae_title = "PACS"\nhost = "h"\nport = 104\nurl = "http://h/dw"',
     'destinations.0: url belongs to kind = "dicomweb" destinations only'),
    ('kind = "dicomweb"\nurll = "http://h/dw"', "did you mean 'destinations.0.url'"),
    ('kind = "web"\nurl = "http://h/dw"', 'kind must be "dimse" (the default) or "dicomweb"'),
    ('kind = "dicomweb"\nurl = "ftp://h/dw"', "destinations.0.url: 'ftp://h/dw' is not"),
    ('kind = "dicomweb"\nurl = "http://h/dw"\nusername = "u"', "username and password_file"),
])
def test_mixed_or_wrong_destination_keys_are_named(tmp_path: Path, text: str,
                                                   message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f'[[destinations]]\nname = "x"\n{text}\n')
    assert message in str(caught.value)


# --- the STOW-RS receiver through the HTTP application -----------------------------------------

def _app(runtime: Runtime, max_mb: int = 64, **http: Any) -> HttpApp:
    settings = runtime.settings.http.model_copy(update=http)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    stow = StowReceiver(receiver, max_mb * 2**20)
    return HttpApp(CollectorRegistry(), Readiness([("x", lambda: CheckResult(True, ""))]),
                   Guard(settings), None, stow)


def _stow(app: HttpApp, parts: list[bytes], target: str = "/dicom-web/studies",
          **headers: str) -> Any:
    body = _body(parts)
    return call(app, "POST", target, body, {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary',
        "Accept": "application/dicom+json", **headers})


def _answer(response: Any) -> tuple[list[str], dict[str, int]]:
    data = json.loads(response.body)
    stored = [item["00081155"]["Value"][0] for item in data["00081199"].get("Value", [])]
    failed = {(item.get("00081155", {}).get("Value") or [""])[0]: item["00081197"]["Value"][0]
              for item in data["00081198"].get("Value", [])}
    return stored, failed


def test_stow_stores_every_instance_durably(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    response = _stow(_app(runtime), [p.read_bytes() for p in mr_series.paths])
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    stored, failed = _answer(response)
    assert not failed and sorted(stored) == sorted(mr_series.sop_instance_uids)
    with runtime.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.received_via == source_of(None) == "STOW-RS, no login (loopback)"
        assert series.instance_count == len(mr_series.paths)
        assert series.released_at is not None  # the request delivered the series whole
        rows = session.scalars(select(InstanceRow)).all()
    for row in rows:
        kept = pydicom.dcmread(runtime.store.path(row.path))
        assert kept.SOPInstanceUID == row.sop_instance_uid
    assert not list(runtime.store.incoming.glob("*.part"))


def test_stow_lists_refused_instances_with_the_dimse_status(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    good = [p.read_bytes() for p in mr_series.paths[:2]]
    truncated = mr_series.paths[2].read_bytes()[:-500]
    response = _stow(_app(runtime), [*good, truncated, b"not dicom at all"])
    assert response.status == 202
    stored, failed = _answer(response)
    assert len(stored) == 2
    assert failed[mr_series.sop_instance_uids[2]] == Status.CANNOT_UNDERSTAND
    assert failed[""] == Status.CANNOT_UNDERSTAND
    with runtime.sessions() as session:
        assert len(session.scalars(select(InstanceRow)).all()) == 2


def test_stow_none_stored_is_409(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    response = _stow(_app(runtime), [mr_series.paths[0].read_bytes()],
                     target="/dicom-web/studies/1.2.3.4")
    assert response.status == 409
    _, failed = _answer(response)
    assert failed == {mr_series.sop_instance_uids[0]: Status.CANNOT_UNDERSTAND_NOT_THIS_STUDY}
    response = _stow(_app(runtime), [mr_series.paths[0].read_bytes()],
                     target=f"/dicom-web/studies/{mr_series.study_uid}")
    assert response.status == 200


def test_stow_out_of_space_is_a700(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.storage.db import make_engine
    from denoised_node.storage.runtime import open_runtime
    from denoised_node.storage.schema import upgrade

    settings = settings_factory(node__min_free_mb=100000000)
    upgrade(make_engine(settings.database_url))
    response = _stow(_app(open_runtime(settings)), [mr_series.paths[0].read_bytes()])
    assert response.status == 409
    assert _answer(response)[1] == {mr_series.sop_instance_uids[0]: Status.OUT_OF_RESOURCES}


def test_stow_body_cut_short_keeps_only_whole_parts(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    parts = [p.read_bytes() for p in mr_series.paths[:3]]
    body = _body(parts)
    cut = body[:len(body) - len(parts[2]) // 2]  # half of the third part, no closing delimiter
    response = call(_app(runtime), "POST", "/dicom-web/studies", cut, {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'})
    assert response.status == 202
    stored, failed = _answer(response)
    assert sorted(stored) == sorted(mr_series.sop_instance_uids[:2])
    assert failed == {mr_series.sop_instance_uids[2]: Status.CANNOT_UNDERSTAND}
    with runtime.sessions() as session:
        assert len(session.scalars(select(InstanceRow)).all()) == 2


@pytest.mark.parametrize(("headers", "status"), [
    ({"Content-Type": "application/dicom"}, 415),
    ({"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'}, 415),
    ({"Content-Type": "multipart/related; type=application/dicom"}, 400),
    ({"Content-Type": "multipart/related; boundary=zzz"}, 400),
    ({"Content-Type": "multipart/related; boundary=b0undary", "Accept": "text/html"}, 406),
])
def test_stow_bad_requests(runtime: Runtime, mr_series, headers: dict[str, str],  # type: ignore[no-untyped-def]
                           status: int) -> None:
    body = _body([mr_series.paths[0].read_bytes()])
    assert call(_app(runtime), "POST", "/dicom-web/studies", body, headers).status == status


def test_stow_too_large_a_body_is_413(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    app = _app(runtime, max_mb=1)
    response = _stow(app, [p.read_bytes() for p in mr_series.paths] * 20)
    assert response.status == 413 and "http.max_stow_mb" in response.text


def test_stow_is_behind_the_guard(runtime: Runtime, mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "token"
    token.write_text("s3cret")
    app = _app(runtime, token_file=token)
    assert _stow(app, [mr_series.paths[0].read_bytes()]).status == 401
    response = _stow(app, [mr_series.paths[0].read_bytes()], Authorization="Bearer s3cret")
    assert response.status == 200
    with runtime.sessions() as session:
        assert session.scalars(select(Series.received_via)).one() == "STOW-RS, bearer token"


def test_stow_off_and_other_methods(runtime: Runtime) -> None:
    app = _app(runtime)
    assert call(app, "GET", "/dicom-web/studies").status == 405
    assert call(app, "POST", "/dicom-web/series").status == 404
    off = HttpApp(CollectorRegistry(), Readiness([]), Guard(runtime.settings.http))
    answer = call(off, "POST", "/dicom-web/studies", b"x", {"Content-Type": "multipart/related"})
    assert answer.status == 404 and "http.stow_rs" in answer.text


def test_stow_non_mr_instance_is_kept_as_ignored(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(mr_series.paths[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    out = io.BytesIO()
    ds.save_as(out)
    response = _stow(_app(runtime), [out.getvalue()])
    assert response.status == 200  # kept and recorded, not processed: as over DIMSE


def _peak_while_receiving(runtime: Runtime, series, tmp_path: Path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(body bytes, peak bytes allocated) for one STOW-RS request of the series' files."""
    body_path = tmp_path / f"body-{len(series.paths)}"
    body_path.write_bytes(_body([p.read_bytes() for p in series.paths]))
    size = body_path.stat().st_size
    stow = _app(runtime).stow
    assert stow is not None
    headers = {"content-type": 'multipart/related; type="application/dicom"; boundary=b0undary',
               "content-length": str(size)}
    with body_path.open("rb") as body:
        tracemalloc.start()
        try:
            response = stow.handle("POST", "/dicom-web/studies", headers, body, None)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status == 200
    return size, peak


def test_stow_memory_is_bounded_by_a_chunk_not_the_request(runtime: Runtime, mr_series_factory,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    small = _peak_while_receiving(runtime, mr_series_factory(slices=8, rows=256, columns=256),
                                  tmp_path)
    large = _peak_while_receiving(runtime, mr_series_factory(slices=64, rows=256, columns=256,
                                                             seed=3), tmp_path)
    assert large[0] > 7 * small[0] and large[0] > 8 * 2**20
    # One chunk (1 MiB) and a part's bookkeeping at a time, whatever the body's size.
    assert large[1] < 3 * 2**20 and large[1] < small[1] + 512 * 2**10, (small, large)


# --- the STOW-RS client against a scripted server ----------------------------------------------

class _Scripted:
    """A loopback HTTP/1.1 server answering STOW-RS requests from a script: each entry is
    (status, answer) where answer is "all" (every instance referenced), "none", or a dict
    of DICOM JSON; it records each request's part count and the connections opened."""

    def __init__(self, script: list[tuple[int, Any]]) -> None:
        import http.server
        import threading

        self.script = list(script)
        self.parts: list[int] = []
        self.connections = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                media = MediaType.parse(self.headers["Content-Type"])
                reader = MultipartReader(io.BytesIO(body), media.parameters["boundary"])
                uids = []
                while reader.next_part() is not None:
                    chunks: list[bytes] = []
                    reader.read_part(chunks.append)
                    uids.append(pydicom.dcmread(io.BytesIO(b"".join(chunks))).SOPInstanceUID)
                outer.parts.append(len(uids))
                status, answer = outer.script.pop(0) if outer.script else (200, "all")
                if answer == "all":
                    answer = {"00081199": {"vr": "SQ", "Value": [
                        {"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}}
                data = b"" if answer == "none" else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(server: _Scripted, files: list[Path], **destination: Any) -> Any:
    from denoised_node.daemon.jobs.destinations import send_to

    settings = load_settings(None, environ={})
    target = DicomwebDestination(name="web", kind="dicomweb", url=server.url, **destination)
    progress: list[tuple[int, int]] = []
    result = send_to(settings, target, files, lambda sent, total: progress.append((sent, total)))
    return result, progress


def test_client_sends_bounded_batches_on_one_connection(mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=10, rows=256, columns=256)  # 128 KiB each
    server = _Scripted([])
    try:
        result, progress = _send(server, series.paths, batch_mb=1)
    finally:
        server.close()
    assert result.sent == 10
    assert server.parts == [7, 3]  # 7 x 128 KiB and a bit fit in 1 MiB
    assert server.connections == 1  # keep-alive
    assert progress == [(7, 10), (10, 10)]


@pytest.mark.parametrize(("status", "answer", "permanent", "said"), [
    (500, "none", False, "HTTP 500"),
    (503, "none", False, "HTTP 503"),
    (404, "none", True, "HTTP 404"),
    (413, "none", True, "HTTP 413"),
    (409, {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xC000]}}]}},
     True, "HTTP 409"),
    (202, {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA700]}}]}},
     False, "out of resources"),
    (200, {}, False, "missing from the answer"),
])
def test_client_reads_the_answer(mr_series, status: int, answer: Any, permanent: bool,  # type: ignore[no-untyped-def]
                                 said: str) -> None:
    from denoised_node.daemon.dicomweb.client import DicomwebError

    if isinstance(answer, dict) and "00081198" in answer:
        answer["00081198"]["Value"][0]["00081155"] = {
            "vr": "UI", "Value": [mr_series.sop_instance_uids[0]]}
    server = _Scripted([(status, answer)])
    try:
        with pytest.raises(DicomwebError) as caught:
            _send(server, mr_series.paths[:3])
    finally:
        server.close()
    assert caught.value.permanent is permanent
    assert said in str(caught.value)
    assert bool(caught.value.fix) is permanent


def test_client_refuses_a_dimse_key_and_a_wrong_url() -> None:
    with pytest.raises(ValueError, match="is not an http"):
        DicomwebDestination(name="w", kind="dicomweb", url="pacs:104")
