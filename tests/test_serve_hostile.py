"""`mnist serve` against clients that mean harm: what one may cost, connections that stall, odd requests.

A real server process; small limits through its settings keep each case quick. The figures (peak
memory of a storm, latency with hundreds of stalled connections) are bench/serve_hostile.py's.
"""

from __future__ import annotations

import io
import json
import re
import socket
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from PIL import Image, ImageDraw

from conftest import Served, wait_until
from test_page import browser  # noqa: F401 (a fixture: a test's parameter)
from test_serve import multipart
from test_versions import versions_copy, three_versions  # noqa: F401 (fixtures)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def seven(size: int = 280, mode: str = "L") -> bytes:
    image = Image.new(mode, (size, size), 255 if mode == "L" else (0, 0, 0, 0))
    ink = 0 if mode == "L" else (0, 0, 0, 255)
    ImageDraw.Draw(image).line([(size * .3, size * .15), (size * .7, size * .15), (size * .45, size * .85)],
                               fill=ink, width=max(3, size // 12))
    return png(image)


PNG = {"Content-Type": "image/png"}


def address(served: Served) -> Tuple[str, int]:
    host, port = re.match(r"http://([^:/]+):(\d+)", served.url).groups()
    return host, int(port)


def connect(served: Served) -> socket.socket:
    sock = socket.create_connection(address(served), timeout=60)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    finally:
        sock.close()


def exchange(served: Served, request: bytes) -> bytes:
    sock = connect(served)
    sock.sendall(request)
    return read_all(sock)


def parse(answer: bytes) -> Tuple[int, Dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_json_error(answer: bytes, status: int, fragment: str = "") -> Dict[str, str]:
    got, headers, body = parse(answer)
    assert got == status, answer[:500]
    assert headers.get("content-type", "").startswith("application/json"), answer[:500]
    assert fragment in json.loads(body)["error"], body
    return headers


def metric(served: Served, line_start: str) -> Optional[float]:
    text = served.request("GET", "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return None


def test_an_image_is_limited_by_what_it_decodes_to_not_by_its_pixels(served_trained):
    served, _ = served_trained
    # 9 megapixels, within Pillow's own cap, but 36 MB of RGBA to decode
    status, body = served.json("POST", "/predict", seven(3000, "RGBA"), PNG)
    assert status == 400 and "MB" in body["error"] and "3000x3000" in body["error"], body
    # as many pixels in 8-bit grey decode to a quarter of that: read
    status, body = served.json("POST", "/predict", seven(3000), PNG)
    assert status == 200 and body["predictions"][0]["digit"] == 7, body


def test_decodes_beyond_the_slots_wait_in_a_bounded_queue_then_get_503(serve, trained_root, tmp_path):
    release = tmp_path / "release"
    served = serve(trained_root, "--max-decodes", "1", "--max-waiting", "1",
                       env={"MNIST_FAULT": f"hold:decode:{release}"})
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    answers: Dict[str, Tuple[int, dict]] = {}

    def send(name: str, body: bytes, headers: Dict[str, str]) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.__setitem__(name, served.json("POST", "/predict", body,
                                                                                       headers)))
        thread.start()
        return thread

    # 64 files: their decodes take the only slot one at a time, never 64 decoded images at once (a request
    # as small as one drawing is decoded on the event loop, without a slot: these are larger)
    first = send("first", *multipart([("7.png", seven())] * 64))
    wait_until(lambda: Path(f"{release}.held").exists(), "the first request to hold the decode slot")
    assert metric(served, "mnist_decodes_running") == 1
    second = send("second", seven(400), PNG)
    wait_until(lambda: metric(served, "mnist_decodes_waiting") == 1, "the second request to wait")
    status, headers, data = served.request("POST", "/predict", seven(400), PNG)  # the queue is full
    assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(data)["error"], data
    release.touch()
    first.join()
    second.join()
    assert answers["first"][0] == 200 and [p["digit"] for p in answers["first"][1]["predictions"]] == [7] * 64
    assert answers["second"][0] == 200, answers["second"]


def test_hundreds_of_stalled_connections_are_harmless_and_closed_in_time(serve, trained_root):
    served = serve(trained_root, "--read-timeout", "2")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    stalled = []
    for _ in range(300):  # half a request head each, then nothing more
        sock = connect(served)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        stalled.append(sock)
    assert served.json("GET", "/healthz")[0] == 200
    status, body = served.json("POST", "/predict", seven(), PNG)
    assert status == 200 and body["predictions"][0]["digit"] == 7
    # each is closed once --read-timeout passes with no whole head (granian: closed without an answer)
    assert {read_all(sock) for sock in stalled} == {b""}


def test_a_request_head_or_body_that_stalls_is_dropped(serve, trained_root):
    served = serve(trained_root, "--read-timeout", "1")
    assert exchange(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == b""  # the blank line never comes
    body = exchange(served, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: 1000\r\n\r\n\x89PNG")
    assert_json_error(body, 408, "body")


def test_content_length_with_chunked_is_answered_then_closed_so_nothing_is_smuggled(served_trained):
    served, _ = served_trained
    answer = exchange(served, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                              b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                              b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = parse(answer)
    assert status == 400 and headers.get("connection") == "close", answer[:300]  # (RFC 9112, section 6.1)
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the second request, smuggled in the body, unanswered


@pytest.mark.parametrize("request_bytes", [
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
], ids=["negative length", "two lengths", "bad chunk", "bad header"])
def test_malformed_http_is_a_400_and_the_server_keeps_serving(served_trained, request_bytes):
    served, _ = served_trained
    answer = exchange(served, request_bytes)
    # granian answers what it cannot parse itself, before the app: a bare 400 (or just a close mid-body)
    assert answer == b"" or parse(answer)[0] == 400, answer[:300]
    assert served.json("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("path", ["/report/index.html%00.png", "/static/app.js%00", "/%00"])
def test_a_nul_byte_in_a_path_is_a_json_404(served_trained, path):
    served, _ = served_trained
    status, body = served.json("GET", path)
    assert status == 404 and "error" in body


def test_a_bad_range_on_the_report_is_a_json_error(served_trained):
    served, root = served_trained
    size = (root / "model" / "report" / "index.html").stat().st_size
    status, headers, data = served.request("GET", "/report/index.html", headers={"Range": f"bytes={size + 10}-"})
    assert status == 416 and headers["content-type"].startswith("application/json"), data
    assert headers["content-range"] == f"bytes */{size}" and "error" in json.loads(data)
    status, headers, data = served.request("GET", "/report/index.html", headers={"Range": "bytes=abc"})
    assert status in (400, 416) and headers["content-type"].startswith("application/json"), data
    status, _, data = served.request("GET", "/report/index.html", headers={"Range": "bytes=0-9"})
    assert status == 206 and len(data) == 10


def test_a_client_gone_mid_upload_is_no_server_error(served_trained):
    served, _ = served_trained
    counted = 'mnist_requests_total{route="/predict",status="400"}'  # (granian: a body that broke off)
    before = metric(served, counted) or 0
    sock = connect(served)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                 b"\x89PNG\r\n")
    sock.close()
    wait_until(lambda: (metric(served, counted) or 0) > before, "the server to count the request the client left")
    assert metric(served, 'mnist_requests_total{route="/predict",status="500"}') is None
    # (and no traceback in the server's log: served_trained checks it when it stops)


def test_every_answer_has_a_content_security_policy_and_nosniff(served_trained):
    served, _ = served_trained
    answers = {path: served.request("GET", path) for path in ("/", "/static/app.js", "/healthz", "/readyz",
                                                             "/metrics", "/report/", "/nothing-here")}
    answers["POST /predict"] = served.request("POST", "/predict", b"not an image", PNG)
    for what, (_, headers, _) in answers.items():
        headers = {k.lower(): v for k, v in headers.items()}
        assert headers["x-content-type-options"] == "nosniff", what
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src" not in policy, (what, policy)
        # inline styles only for the report (its <style>), inline scripts nowhere
        assert ("'unsafe-inline'" in policy) == (what == "/report/"), (what, policy)


@pytest.mark.xdist_group("report")  # with the other browser tests (test_page): one Chromium
def test_the_page_and_the_report_work_under_their_policy(served_trained, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    served, _ = served_trained
    browser.get_log("browser")  # what earlier pages logged
    browser.get(served.url + "/")
    WebDriverWait(browser, 60).until(lambda b: "epoch" in b.find_element("id", "model").text)
    browser.get(served.url + "/report/")
    # the report's inline <style> applies: its figures are laid out as boxes, not plain text
    assert browser.find_element("css selector", ".figure b").value_of_css_property("display") == "block"
    violations = [entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in
                  entry["message"]]
    assert violations == []


def test_answers_do_not_say_where_the_volume_is(serve, tmp_path):
    root = tmp_path / "volume-at-a-private-place"
    root.mkdir()
    served = serve(root)
    for path in ("/readyz", "/report/", "/report/index.html"):
        status, headers, data = served.request("GET", path)
        assert status in (404, 503) and str(tmp_path) not in data.decode(), (path, data)
        assert "volume-at-a-private-place" not in data.decode(), (path, data)
    status, body = served.json("GET", "/report/")
    assert "the volume's model/report/" in body["error"]
    status, body = served.json("POST", "/predict", seven(), PNG)
    assert status == 503 and "model/mnist_cnn.pt" in body["error"] and str(tmp_path) not in body["error"]




@pytest.mark.parametrize("asked", ["\u00b2", "\u0663", "9" * 5000, "-1", "1.0", "0"])
def test_a_version_is_ascii_digits_within_bounds(served_trained, asked):
    served, _ = served_trained
    status, body = served.json("POST", "/predict?version=" + urllib.parse.quote(asked), seven(), PNG)
    assert status == 400 and "version" in body["error"], body


def test_a_symlinked_report_folder_is_not_served(serve, trained_root, tmp_path):
    root = tmp_path / "volume"
    shutil.copytree(trained_root / "model", root / "model", ignore=shutil.ignore_patterns("report"))
    (root / "model" / "report").symlink_to("/")
    served = serve(root)
    for path in ("/report/etc/passwd", "/report/", "/report/index.html"):
        status, body = served.json("GET", path)
        assert status == 404 and "root:" not in json.dumps(body), (path, body)


def test_a_client_cycling_versions_waits_for_no_load_of_another(serve, versions_copy, tmp_path):
    release = tmp_path / "release"
    served = serve(versions_copy, "--threshold", "0", env={"MNIST_FAULT": f"hold:version-load:{release}"})
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    first: Dict[str, Tuple[int, dict]] = {}
    loading = threading.Thread(target=lambda: first.update(answer=served.json("POST", "/predict?version=1",
                                                                              seven(), PNG)))
    loading.start()
    wait_until(lambda: Path(f"{release}.held").exists(), "version 1 to be loading")
    status, headers, data = served.request("POST", "/predict?version=2", seven(), PNG)  # another load: not now
    assert status == 503 and headers["retry-after"] == "1" and "loading" in json.loads(data)["error"], data
    status, body = served.json("POST", "/predict", seven(), PNG)  # the model serving needs no load: answered
    assert status == 200 and body["checkpoint"]["version"] == 3
    release.touch()
    loading.join()
    assert first["answer"][0] == 200 and first["answer"][1]["checkpoint"]["version"] == 1


def test_a_request_id_is_echoed_and_the_access_log_names_it(serve, trained_root):
    served = serve(trained_root, "--access-log")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    assert served.request("GET", "/healthz", headers={"X-Request-ID": "abc-123"})[1]["x-request-id"] == "abc-123"
    made = served.request("GET", "/healthz", headers={"X-Request-ID": "not an id\u00e9"})[1]["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", made)
    status, headers, _ = served.request("POST", "/predict", seven(), PNG)
    wait_until(lambda: any(headers["x-request-id"] in line for line in served.stderr), "the access log line")
    line = next(line for line in served.stderr if headers["x-request-id"] in line)
    assert "POST /predict 200" in line and "ms" in line


def test_the_access_log_is_off_by_default(served_trained):
    served, _ = served_trained
    _, headers, _ = served.request("GET", "/healthz")
    assert re.fullmatch("[0-9a-f]{32}", headers["x-request-id"])
    served.request("GET", "/healthz")
    assert not any(headers["x-request-id"] in line for line in served.stderr)
