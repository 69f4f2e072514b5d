"""`mnist serve` against clients that mean harm: what one may cost, connections that stall, odd requests.

A real server process; small limits through its settings keep each case quick. The figures (peak
memory of a storm, latency with hundreds of stalled connections) are bench/serve_hostile.py's.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from PIL import Image, ImageDraw

from conftest import Served, wait_until
from test_page import browser  # noqa: F401 (a fixture: a test's parameter)
from test_serve import multipart
from mnist_pipeline.serve import connections as serve_module


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

    # 64 files: their decodes take the only slot one at a time, never 64 decoded images at once
    first = send("first", *multipart([("7.png", seven())] * 64))
    wait_until(lambda: Path(f"{release}.held").exists(), "the first request to hold the decode slot")
    assert metric(served, "mnist_decodes_running") == 1
    second = send("second", seven(), PNG)
    wait_until(lambda: metric(served, "mnist_decodes_waiting") == 1, "the second request to wait")
    status, headers, data = served.request("POST", "/predict", seven(), PNG)  # the queue is full
    assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(data)["error"], data
    release.touch()
    first.join()
    second.join()
    assert answers["first"][0] == 200 and [p["digit"] for p in answers["first"][1]["predictions"]] == [7] * 64
    assert answers["second"][0] == 200, answers["second"]


def test_stalled_connections_make_room_for_new_clients(serve, trained_root):
    served = serve(trained_root, "--max-connections", "4")
    wait_until(lambda: served.json("GET", "/readyz")[0] == 200, "the server to load the model")
    stalled = []
    for _ in range(10):  # one header line each, then nothing
        sock = connect(served)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        stalled.append(sock)
    assert served.json("GET", "/healthz")[0] == 200
    status, body = served.json("POST", "/predict", seven(), PNG)
    assert status == 200 and body["predictions"][0]["digit"] == 7
    # the server closed the stalled connections that were idle longest, the first ones, to stay at 4
    for sock in stalled[:6]:
        assert read_all(sock) == b""
    for sock in stalled[6:]:
        sock.close()


def test_a_request_head_or_body_that_stalls_is_answered_408_and_closed(serve, trained_root):
    served = serve(trained_root, "--read-timeout", "1")
    head = exchange(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
    assert_json_error(head, 408, "head")
    body = exchange(served, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: 1000\r\n\r\n\x89PNG")
    assert_json_error(body, 408, "body")
    assert exchange(served, b"") == b""  # a connection that sends nothing is closed without a word


@pytest.mark.parametrize("request_bytes", [
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
], ids=["negative length", "two lengths", "bad chunk", "bad header"])
def test_malformed_http_is_a_json_400_with_the_security_headers(served_trained, request_bytes):
    served, _ = served_trained
    headers = assert_json_error(exchange(served, request_bytes), 400, "malformed HTTP")
    assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers[
        "content-security-policy"]
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
    sock = connect(served)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                 b"\x89PNG\r\n")
    sock.close()
    wait_until(lambda: metric(served, 'mnist_requests_total{route="/predict",status="499"}'),
               "the server to count the request the client left")
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


def test_a_repeated_log_message_is_logged_at_most_once_a_second(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(serve_module.time, "monotonic", lambda: clock[0])
    flood = serve_module.OncePerSecond()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, message, None, None)

    passed = [flood.filter(record("Invalid HTTP request received.")) for _ in range(100)]
    assert passed.count(True) == 1
    assert flood.filter(record("another message"))  # alike only when the same
    clock[0] += 1.5
    later = record("Invalid HTTP request received.")
    assert flood.filter(later) and "99 more like it" in later.getMessage()
