"""`mnist serve --workers N` (granian's worker processes): several on one port, each following the volume,
/metrics summed over them, killed ones replaced under load, and a stop that ends them all. The volume:
test_versions' three versions, of which version 3 is production."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Dict

import pytest

from conftest import assert_one_line_error, run_mnist, wait_until
from test_versions import digit, ok, three_versions, versions_copy  # noqa: F401 (digit, three_versions, versions_copy: fixtures)

PNG = {"Content-Type": "image/png"}


def metric(served, name: str) -> Dict[str, float]:
    """The samples of `name` on /metrics by their labels ("" for none; none while a killed worker's connections
    reset)."""
    try:
        text = served.request("GET", "/metrics")[2].decode()
    except OSError:
        return {}
    return {labels or "": float(value)
            for labels, value in re.findall(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.MULTILINE)}


def versions_served(served) -> Dict[int, int]:
    """Each live worker's served version, by its pid."""
    return {int(re.fullmatch(r'pid="(\d+)"', labels).group(1)): int(value)
            for labels, value in metric(served, "mnist_model_version").items()}


def listeners(served) -> int:
    """Sockets listening on serve's port (each worker has its own: SO_REUSEPORT), from /proc/net/tcp."""
    port = f"{int(served.url.rsplit(':', 1)[1]):04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(":" + port) and line.split()[3] == "0A")


def predicted(served) -> float:
    return metric(served, "mnist_requests_total").get('route="/predict",status="200"', 0.0)


def test_workers_switch_versions_together_without_a_failed_request_and_metrics_sum(serve, versions_copy, digit):
    root = versions_copy
    served = serve(root, "--threshold", "0", "--workers", "2")
    first = wait_until(lambda: (lambda v: len(v) == 2 and set(v.values()) == {3} and v)(versions_served(served)),
                       "two workers serving version 3")
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, headers, _ = served.request("POST", "/predict", digit, PNG)
            answers.append((status, headers.get("x-model-version")))
            stop.wait(0.005)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(answers) >= 10, "answers from version 3")
        ok("promote", "1", "--root", str(root))
        wait_until(lambda: set(versions_served(served).values()) == {1}, "every worker to serve version 1")
        switched = len(answers)
        wait_until(lambda: len(answers) >= switched + 10, "answers after the switch")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert [a for a in answers if a[0] != 200] == [], "failed requests"
    assert answers[0][1] == "3" and {version for _, version in answers[switched:]} == {"1"}
    assert set(versions_served(served)) == set(first), "the same two workers, none restarted"
    # the requests counted by whichever worker answered them, summed
    wait_until(lambda: predicted(served) >= len(answers), "the counts")
    assert predicted(served) == len(answers)


def test_killed_workers_are_replaced_under_load_and_a_stop_ends_every_worker(serve, versions_copy, digit):
    served = serve(versions_copy, "--threshold", "0", "--workers", "2")
    pids = wait_until(lambda: (lambda v: len(v) == 2 and v)(versions_served(served)), "two workers")
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                answers.append(served.request("POST", "/predict", digit, PNG)[0])
            except OSError:  # (a connection of the killed worker's, reset)
                answers.append("reset")

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        alive = set(pids)
        for killed in sorted(pids):  # each worker in turn, under load: the port keeps answering
            # (a worker shows in /metrics once its app is built, and binds the port a moment later: one is
            # killed only while both listen, or none might)
            wait_until(lambda: listeners(served) == 2, "both workers to listen")
            os.kill(killed, signal.SIGKILL)
            alive = wait_until(lambda k=killed: (lambda v: len(v) == 2 and k not in v and set(v.values()) == {3} and v)(
                versions_served(served)), "the killed worker replaced, serving version 3")
            answered = len(answers)
            wait_until(lambda a=answered: len(answers) >= a + 10, "answers after the replacement")
            assert set(answers[answered:]) == {200}
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert not set(alive) & set(pids)
    assert "".join(served.stderr).count("Unexpected exit from worker") == 2
    failures = [answer for answer in answers if answer != 200]
    assert set(failures) <= {"reset"}, failures  # never an error answer: only connections a kill cut
    # a kill cuts each client's request in flight, and at most the one it sends next, in the instant before the
    # kernel closes the killed worker's listening socket (a connection queued there is reset too)
    assert len(failures) <= 2 * len(clients) * len(pids), failures
    # whichever worker answered, the killed ones included: a worker counts an answer once it is sent, so one
    # killed in that instant may miss the count of an answer its client read, or count one its client never did
    wait_until(lambda: predicted(served) >= answers.count(200) - len(pids), "the counts")
    assert answers.count(200) - len(pids) <= predicted(served) <= answers.count(200) + answers.count("reset")

    served.close()  # SIGTERM
    assert served.process.returncode == 143
    for pid in alive:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the parent"


def test_a_worker_that_cannot_start_is_one_error_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_mnist("serve", "--root", str(tmp_path), "--port", "0", "--workers", "2", "--device", "cuda",
                       timeout=120)
    assert_one_line_error(result, 1, "cuda")


def test_a_worker_that_keeps_dying_ends_serve_with_one_error_line(tmp_path):
    # each worker is killed (kill -9) as it builds its app: granian replaces it once, then gives up, and
    # serve exits for its supervisor (Compose's restart policy, Kubernetes) to start it again
    result = run_mnist("serve", "--root", str(tmp_path), "--port", "0", "--workers", "2",
                       env={"MNIST_FAULT": "serve-worker"}, timeout=120)
    assert_one_line_error(result, 1, "a serve worker kept dying right after its restart")
    assert "Unexpected exit from worker" in result.stderr


def test_a_stop_lets_the_requests_in_flight_finish(serve, versions_copy, digit, tmp_path):
    release = tmp_path / "release"
    served = serve(versions_copy, "--threshold", "0", "--workers", "2", env={"MNIST_FAULT": f"hold:decode:{release}"})
    wait_until(lambda: len(versions_served(served)) == 2, "two workers")
    answer: Dict[str, tuple] = {}
    in_flight = threading.Thread(target=lambda: answer.update(got=served.request("POST", "/predict", digit, PNG)))
    in_flight.start()
    wait_until(lambda: Path(f"{release}.held").exists(), "a request to be decoding")
    served.process.terminate()  # SIGTERM while it is
    release.touch()
    in_flight.join(timeout=60)
    assert answer["got"][0] == 200, answer  # answered before its worker ended
    assert served.process.wait(timeout=60) == 143


def test_serve_without_granian_names_the_serve_image(tmp_path):
    # the train/evaluate/infer image leaves the HTTP stack out: a granian that does not import stands for that
    fake = tmp_path / "site" / "granian"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named granian')\n")
    result = run_mnist("serve", "--root", str(tmp_path), "--port", "0", fresh=True,
                       env={"PYTHONPATH": str(tmp_path / "site")})
    assert_one_line_error(result, 1, "granian", "serve image")
