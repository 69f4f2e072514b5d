"""Hostile volumes, crashes at named fault points, `docker compose up` ordering, usage errors, and the
small pieces that used to go untested. Most tests use an untrained but complete checkpoint with a
matching evaluation, so they need no training."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (MIRROR, assert_one_line_error, litter, mnist_env, private_copy, read_until, run_here,
                      run_mnist, start_mnist)
from test_data import http_server
from test_records import write_evaluation
from mnist_pipeline import cli, data, evaluate, limits, settings
from mnist_pipeline.records import checkpoint
from mnist_pipeline.storage import atomic, locks
from mnist_pipeline.train import resume
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.volume import Volume


@pytest.fixture(scope="session")
def test_data(tmp_path_factory) -> Path:
    """data/ holding the two test-split files (all evaluate and infer read)."""
    folder = tmp_path_factory.mktemp("test-data") / "data"
    data.ensure(folder, str(MIRROR), splits=("test",))
    return folder


def untrained_state() -> dict:
    return resume.TrainingState.fresh(settings.Recipe(), torch.device("cpu")).snapshot().to_dict()


def write_checkpoint(path: Path, state: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_evaluated(root: Path, state: dict) -> None:
    """`state` as the checkpoint, with an evaluation that names it as passing."""
    sha = write_checkpoint(root / "model" / "mnist_cnn.pt", state)
    write_evaluation(root, sha, state["epoch"])


@pytest.fixture
def evaluated_root(tmp_path, test_data) -> Path:
    """A volume with test data, an (untrained) checkpoint and an evaluation that names it as passing."""
    root = tmp_path / "volume"
    private_copy(test_data, root / "data")
    write_evaluated(root, untrained_state())
    return root


def results_consistent(results: Path) -> set:
    """The PNG names of a results/ folder, checked against its predictions.json."""
    listed = {p["file"] for p in json.loads((results / "predictions.json").read_text())["predictions"]}
    assert {p.name for p in results.iterdir()} == listed | {"predictions.json"}
    return listed


# --- 1. nothing opened for writing follows a symlink out of the volume -----------------------------------

def test_a_symlinked_train_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "volume" / "model").mkdir(parents=True)
    (tmp_path / "volume" / "model" / ".train.lock").symlink_to(victim)
    result = run_here("train", "--root", str(tmp_path / "volume"))
    assert_one_line_error(result, 1, ".train.lock", "symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_dangling_evaluate_lock_symlink_creates_nothing_outside(tmp_path):
    outside = tmp_path / "outside"
    (tmp_path / "volume" / "model").mkdir(parents=True)
    (tmp_path / "volume" / "model" / ".evaluate.lock").symlink_to(outside)
    result = run_here("evaluate", "--root", str(tmp_path / "volume"), "--wait", "0")
    assert_one_line_error(result, 1, ".evaluate.lock", "symbolic link")
    assert not outside.exists()


@pytest.mark.parametrize("folder", ["model", "data"])
def test_a_symlinked_model_or_data_folder_is_refused_and_nothing_written_through_it(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "volume").mkdir()
    (tmp_path / "volume" / folder).symlink_to(outside)
    result = run_here("train", "--root", str(tmp_path / "volume"))
    assert_one_line_error(result, 1, folder, "symbolic link")
    assert list(outside.iterdir()) == []


# --- temp files: flocked by their writer, swept when it is dead, never a user's -------------------------

def test_only_dead_writers_temps_are_swept_and_never_a_users_file(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from mnist_pipeline.storage import atomic; "
                               "print(atomic.temp_file(Path(sys.argv[1]), 'x')[1])", str(tmp_path)],
        capture_output=True, text=True, check=True, env=mnist_env()).stdout.strip()
    alive_fd, alive = atomic.temp_file(tmp_path, "y")  # this process lives: its temp stays
    users = [tmp_path / ".tmp-notes", tmp_path / ".mnist-tmp.notes"]
    for path in users:
        path.write_text("mine")
        os.utime(path, (0, 0))  # old: age does not decide
    try:
        atomic.remove_dead_temps(tmp_path)
        assert not Path(dead).exists() and Path(alive).exists()
        assert all(path.read_text() == "mine" for path in users)
    finally:
        os.close(alive_fd)


def test_infer_leaves_a_users_old_tmp_files_alone(evaluated_root):
    notes = evaluated_root / ".tmp-notes"
    notes.write_text("mine")
    os.utime(notes, (0, 0))
    result = run_here("infer", "--root", str(evaluated_root), "--threshold", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert notes.read_text() == "mine"


# --- fault points: the previous state stays, the next run recovers and leaves no litter ---------------

def test_kill_9_before_a_data_file_is_renamed_leaves_it_absent_then_the_next_fetch_sweeps(tmp_path):
    folder = tmp_path / "data"
    code = "import sys; from pathlib import Path; from mnist_pipeline import data; " \
           "data.ensure(Path(sys.argv[1]), sys.argv[2], splits=('test',))"
    killed = subprocess.run([sys.executable, "-c", code, str(folder), str(MIRROR)],
                            env=mnist_env({"MNIST_FAULT": "data-before-rename"}), capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not any((folder / name).exists() for name in data.FILES)  # never a half file under the name
    assert len(litter(folder.parent)) == 1
    data.ensure(folder, str(MIRROR), splits=("test",))
    assert sorted(p.name for p in folder.iterdir()) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def test_kill_9_before_eval_results_is_renamed_keeps_the_previous_one(evaluated_root):
    path = evaluated_root / "model" / "eval_results.json"
    before = path.read_bytes()
    killed = run_mnist("evaluate", "--root", str(evaluated_root), env={"MNIST_FAULT": "eval-before-rename"})
    assert killed.returncode == -signal.SIGKILL
    assert path.read_bytes() == before and len(litter(evaluated_root)) == 1
    result = run_here("evaluate", "--root", str(evaluated_root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(path.read_text())["total"] == 10000
    assert litter(evaluated_root) == []


def test_kill_9_mid_results_swap_leaves_a_whole_folder_and_the_next_infer_no_litter(evaluated_root):
    results = evaluated_root / "results"
    assert run_here("infer", "--root", str(evaluated_root), "--threshold", "0").returncode == 0
    killed = run_mnist("infer", "--root", str(evaluated_root), "--threshold", "0",
                       env={"MNIST_FAULT": "results-between-renames"})
    assert killed.returncode == -signal.SIGKILL
    assert len(results_consistent(results)) == 5  # one atomic exchange: always a whole results/
    assert run_here("infer", "--root", str(evaluated_root), "--threshold", "0").returncode == 0
    assert len(results_consistent(results)) == 5 and litter(evaluated_root) == []


def test_where_there_is_no_exchange_a_swap_cut_between_its_renames_is_undone(evaluated_root):
    results = evaluated_root / "results"
    assert run_here("infer", "--root", str(evaluated_root), "--threshold", "0").returncode == 0
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    code = ("import sys; from pathlib import Path; from mnist_pipeline.storage import atomic; "
            "atomic._exchange = lambda a, b: False; "
            "atomic.replace_dir(Path(sys.argv[1]), lambda folder: (folder / 'x').write_text('new'))")
    killed = subprocess.run([sys.executable, "-c", code, str(results)], capture_output=True,
                            env=mnist_env({"MNIST_FAULT": "results-between-renames"}))
    assert killed.returncode == -signal.SIGKILL
    assert not results.exists()  # the gap the two-rename path has
    atomic.recover_dir(results)  # what infer does first
    assert {p.name: p.read_bytes() for p in results.iterdir()} == before
    assert litter(evaluated_root) == []


def test_a_folder_that_appears_between_the_look_and_the_rename_is_replaced_not_an_error(tmp_path, monkeypatch):
    """Two evaluates writing the first report at once: the second finds the first's folder at its rename."""
    real_lexists = os.path.lexists
    for exchange in (False, True):  # the two-rename path, and the kernel's exchange
        target = tmp_path / f"report-{exchange}"
        looks = []  # "filled", then the placing's two looks find nothing while the rival's folder lands

        def lexists(path, target=target, looks=looks):
            if Path(path) == target and looks and len(looks) < 3:
                looks.append("absent")
                if not real_lexists(target):
                    target.mkdir()
                    (target / "index.html").write_text("first")
                return False
            return real_lexists(path)

        def fill(folder, looks=looks):
            (folder / "index.html").write_text("second")
            looks.append("filled")

        monkeypatch.setattr(os.path, "lexists", lexists)
        if not exchange:
            monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        atomic.replace_dir(target, fill)
        monkeypatch.undo()
        assert looks == ["filled", "absent", "absent"] and (target / "index.html").read_text() == "second"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(target.name)) == [target.name]


# --- 2. `docker compose up`: evaluate and infer give a starting train a grace ----------------------------

GRACE_STARTED = "giving a train that may be starting"


def test_evaluate_gives_a_train_started_beside_it_a_grace_before_rescoring_the_old_checkpoint(evaluated_root):
    """The checkpoint is already evaluated; a train that takes its lock during the grace is waited for."""
    # the grace counts from the start of cli.main (a forked process's too)
    evaluate_ = start_mnist("evaluate", "--root", str(evaluated_root), "--wait", "0", "--grace", "600")
    try:
        read_until(evaluate_, GRACE_STARTED)
        the_volume = Volume(evaluated_root)
        with locks.exclusive_lock(the_volume, "train"):  # this process plays the train that starts late
            state = checkpoint.read(the_volume.checkpoint).state
            checkpoint.write(the_volume.checkpoint, dataclasses.replace(state, epoch=7))
        _, err = evaluate_.communicate(timeout=300)
    finally:
        if evaluate_.poll() is None:
            evaluate_.kill()
    assert evaluate_.returncode == 0, err[-3000:]
    assert json.loads((evaluated_root / "model" / "eval_results.json").read_text())["checkpoint"]["epoch"] == 7


def test_a_new_checkpoint_is_evaluated_at_once_whatever_the_grace(evaluated_root):
    (evaluated_root / "model" / "eval_results.json").unlink()
    result = run_mnist("evaluate", "--root", str(evaluated_root), "--wait", "0", "--grace", "600", timeout=300)
    assert result.returncode == 0 and GRACE_STARTED not in result.stderr, result.stderr[-3000:]


# --- 3. an unwritable root: one error line ------------------------------------------------------------

def test_infer_on_a_read_only_root_is_one_error_line(evaluated_root, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only file system")
    root = tmp_path / "ro"
    root.mkdir()
    if subprocess.run(["mount", "--bind", str(evaluated_root), str(root)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        result = run_here("infer", "--root", str(root), "--threshold", "0")
        assert_one_line_error(result, 1, "results", "Read-only file system", "read-write")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
    assert not (evaluated_root / "results").exists() and litter(evaluated_root) == []


# --- 5. usage errors, never a traceback or a crash ---------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["train", "--batch-size", "60001"], "--batch-size"),
    (["train", "--seed", "99999999999999999999"], "--seed"),
    (["train", "--seed", "9223372036854775807"], "--seed"),
    (["infer", "--seed", "-1"], "--seed"),
    (["train", "--mirror", "http://[::1"], "--mirror"),
    (["train", "--mirror", "http://a b/"], "--mirror"),
    (["train", "--mirror", "ftp://example.org/mnist/"], "--mirror"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--epochs", "1000000000"], "--epochs"),
])
def test_out_of_range_values_are_usage_errors(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--root", str(tmp_path / "volume")], env={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "volume").exists()


@pytest.mark.parametrize("threads", ["100000", "99999999999999999999"])
def test_more_threads_than_cpus_is_a_usage_error_not_a_crash(threads, tmp_path):
    result = run_here("train", "--root", str(tmp_path), "--threads", threads)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--threads" in result.stderr and "at most" in result.stderr


def test_an_empty_mnist_root_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mnist_pipeline", "evaluate"], cwd=tmp_path,
                            env=mnist_env({"MNIST_ROOT": ""}), capture_output=True, text=True)
    assert result.returncode == 2 and "MNIST_ROOT" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["evaluate", "infer"])
def test_evaluate_and_infer_on_a_root_that_does_not_exist_create_nothing(stage, tmp_path):
    result = run_here(stage, "--root", str(tmp_path / "typo"), "--wait", "0")
    assert_one_line_error(result, 1, "no volume at", "typo", "mnist train")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s["train_config"].update(batch_size=0), "batch_size=0"),
    (lambda s: s["train_config"].update(batch_size="x"), "batch_size='x'"),
    (lambda s: s["train_config"].update(peak_lr=float("inf")), "peak_lr=inf"),
    (lambda s: s["train_config"].pop("seed"), "no 'seed'"),
    (lambda s: s.update(rng=torch.zeros(7, dtype=torch.uint8)), "rng"),
    (lambda s: s.update(rng=s["rng"].float()), "rng"),
    (lambda s: s.update(cuda_rng=torch.zeros(3, 3)), "cuda_rng"),
    (lambda s: s.update(loss_sum=float("nan")), "loss_sum"),
    (lambda s: s.update(loss_sum=-1.0), "loss_sum -1.0"),
    (lambda s: s.update(step=-3), "negative"),
    (lambda s: s.update(step=468), "step 468 is past the end of an epoch, 468 steps at its batch size 128"),
    (lambda s: s["train_config"].update(max_steps=20) or s.update(step=20), "step 20 is past the end"),
    (lambda s: s["train_config"].update(momentum_typo=0.9), "does not fit this version"),
])
def test_a_checkpoint_with_a_malformed_state_is_refused_at_load(change, fragment, evaluated_root):
    path = evaluated_root / "model" / "mnist_cnn.pt"
    state = untrained_state()
    change(state)
    write_checkpoint(path, state)
    with pytest.raises(PipelineError, match="not a usable checkpoint") as refused:
        checkpoint.read(path)
    assert fragment in str(refused.value)


def test_train_refuses_a_checkpoint_with_a_malformed_train_config(evaluated_root):
    path = evaluated_root / "model" / "mnist_cnn.pt"
    state = untrained_state()
    state["train_config"]["batch_size"] = 0
    write_checkpoint(path, state)
    before = path.read_bytes()
    result = run_here("train", "--root", str(evaluated_root))
    assert_one_line_error(result, 1, str(path), "batch_size=0", "--fresh")
    assert path.read_bytes() == before


def test_the_limits_cover_every_saved_hyper_parameter():
    assert set(limits.TRAIN_CONFIG) == {f.name for f in dataclasses.fields(settings.Recipe)}
    limits.check_train_config(dataclasses.asdict(settings.Recipe()))  # the defaults pass their own checks


# --- mirrors: blame the right side, cap what they send --------------------------------------------------

@contextlib.contextmanager
def tcp_server(answer):
    """A local server that runs answer(connection) for each client, until the block ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                with contextlib.suppress(OSError):
                    answer(connection, done)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        done.set()
        thread.join(timeout=10)
        server.close()


def test_a_mirror_that_does_not_speak_http_is_a_mirror_error(tmp_path):
    def not_http(connection, _done):
        connection.recv(1024)
        connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    with tcp_server(not_http) as url:
        with pytest.raises(PipelineError, match="MNIST_MIRROR") as refused:
            data.ensure(tmp_path / "data", url, splits=("test",))
    assert "unreachable" in str(refused.value) and "cannot write" not in str(refused.value)


def test_a_trickling_mirror_is_given_up_on_at_the_whole_file_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_DEADLINE_S", 0.2)

    body = gzip.compress(os.urandom(20000))

    def trickle(connection, done):
        connection.recv(1024)
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for byte in body:  # a byte at a time: far longer than the deadline
            if done.wait(0.05):
                break
            connection.sendall(bytes([byte]))

    with tcp_server(trickle) as url:
        with pytest.raises(PipelineError, match="trickling"):
            data.ensure(tmp_path / "data", url, splits=("test",))
    assert litter(tmp_path) == []


def test_a_gzip_bomb_in_a_mirror_is_cut_off_at_the_expected_size(tmp_path):
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with gzip.open(bomb / "t10k-images-idx3-ubyte.gz", "wb") as f:
        for _ in range(64):
            f.write(b"\0" * (1 << 20))  # 64 MB from 64 kB
    with pytest.raises(PipelineError, match="larger than the 7840016 bytes"):
        data.load_split(tmp_path / "data", "test", str(bomb))
    assert list((tmp_path / "data").iterdir()) == []


def test_a_mirror_file_that_cannot_be_read_is_blamed_on_the_mirror(tmp_path):
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/self/mem: a file that opens but fails to read")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "t10k-images-idx3-ubyte.gz").symlink_to("/proc/self/mem")  # reading at offset 0 is EIO
    with pytest.raises(PipelineError) as refused:
        data.load_split(tmp_path / "data", "test", str(broken))
    assert "MNIST_MIRROR" in str(refused.value) and "broke off" in str(refused.value)
    assert "cannot write" not in str(refused.value)


def test_the_public_mirrors_are_tried_in_order_until_one_has_the_file(tmp_path, mirror, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with http_server(empty) as first, http_server(mirror) as second:
        monkeypatch.setattr(data, "PUBLIC_MIRRORS", (first, second))
        assert data.load_split(tmp_path / "data", "test", None).labels[:3].tolist() == [7, 2, 1]
        monkeypatch.setattr(data, "PUBLIC_MIRRORS", (first, first))
        with pytest.raises(PipelineError, match="any public mirror") as refused:
            data.ensure(tmp_path / "other", None, splits=("test",))
    assert str(refused.value).count("HTTP 404") == 2


# --- the pieces that had no test ------------------------------------------------------------------------

class _Fixed(torch.nn.Module):
    """A 'model' answering fixed logits, one row per image in order."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def normalize(self, images):
        return images.float().unsqueeze(1)

    def forward(self, x):
        return self.logits[: len(x)]


def test_score_on_known_inputs_rows_are_true_digits():
    labels = torch.tensor([0, 0, 1, 2])
    predicted = [0, 1, 1, 1]  # one 0 taken for a 1, the 2 taken for a 1
    logits = [[10.0 if d == p else 0.0 for d in range(10)] for p in predicted]
    split = data.Split(images=torch.zeros(4, 28, 28, dtype=torch.uint8), labels=labels)
    state = dataclasses.replace(resume.TrainingState.fresh(settings.Recipe(), torch.device("cpu")).snapshot(), epoch=1)
    scored = checkpoint.Checkpoint(path=Path("x.pt"), sha256="0" * 64, state=state)
    scores = evaluate.score(_Fixed(logits), split, torch.device("cpu"), scored)
    assert scores.correct == 2 and scores.total == 4 and scores.accuracy == 0.5
    confusion = scores.confusion_matrix
    assert confusion[0][:3] == (1, 1, 0) and confusion[1][:3] == (0, 1, 0) and confusion[2][:3] == (0, 1, 0)
    assert scores.per_class_accuracy[0] == 0.5 and scores.per_class_accuracy[2] == 0.0
    right, wrong = torch.softmax(torch.tensor(logits[0]), 0)[0], torch.softmax(torch.tensor(logits[1]), 0)[0]
    expected_loss = -(2 * torch.log(right) + torch.log(wrong) + torch.log(wrong)) / 4
    assert scores.test_loss == pytest.approx(float(expected_loss), rel=1e-5)


def test_infer_waits_while_an_evaluate_runs(evaluated_root):
    (evaluated_root / "model" / "eval_results.json").unlink()
    with locks.shared_lock(Volume(evaluated_root), "evaluate"):  # an evaluate at work
        infer_ = start_mnist("infer", "--root", str(evaluated_root), "--wait", "0", "--threshold", "0")
        try:
            read_until(infer_, "its producer is running")  # with --wait 0 it would have given up
            result = run_here("evaluate", "--root", str(evaluated_root))
            assert result.returncode == 0, result.stderr[-3000:]
            _, err = infer_.communicate(timeout=300)
        finally:
            if infer_.poll() is None:
                infer_.kill()
    assert infer_.returncode == 0, err[-3000:]
    assert len(results_consistent(evaluated_root / "results")) == 5


@pytest.fixture
def data_root(short_trained_root, tmp_path) -> Path:
    """A volume with all four MNIST files and nothing else."""
    root = tmp_path / "volume"
    private_copy(short_trained_root / "data", root / "data")
    return root


def test_mnist_pipeline_trains_evaluates_and_infers_in_one_process(data_root):
    result = run_here("pipeline", "--root", str(data_root), "--max-steps", "20", "--threshold", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    stages = ["train", "evaluate", "infer", "report"]  # (no export: --export never, conftest.mnist_env)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == stages
    sha = hashlib.sha256((data_root / "model" / "mnist_cnn.pt").read_bytes()).hexdigest()
    assert json.loads((data_root / "model" / "eval_results.json").read_text())["checkpoint"]["sha256"] == sha
    predictions = json.loads((data_root / "results" / "predictions.json").read_text())
    assert predictions["checkpoint"]["sha256"] == sha and len(results_consistent(data_root / "results")) == 5


def test_a_resumed_train_keeps_the_checkpoints_hyper_parameters_and_says_so(data_root):
    assert run_here("train", "--root", str(data_root), "--max-steps", "5").returncode == 0
    result = run_here("train", "--root", str(data_root), "--max-steps", "5", "--lr", "0.1", "--batch-size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring" in result.stderr and "--lr 0.1" in result.stderr and "--batch-size 64" in result.stderr
    state = torch.load(data_root / "model" / "mnist_cnn.pt", weights_only=True)
    assert state["epoch"] == 2
    assert (state["train_config"]["peak_lr"], state["train_config"]["batch_size"]) == (0.4, 128)
    again = run_here("train", "--root", str(data_root))  # nothing set: nothing to ignore
    assert again.returncode == 0 and "ignoring" not in again.stderr, again.stderr[-3000:]


def test_a_corrupt_progress_file_is_set_aside_and_training_goes_on(data_root):
    (data_root / "model").mkdir()
    progress = data_root / "model" / "train_progress.pt"
    progress.write_bytes(b"half a file")
    result = run_here("train", "--root", str(data_root), "--max-steps", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved train_progress.pt aside" in result.stderr
    assert [p.read_bytes() for p in progress.parent.glob("train_progress.pt.*.aside")] == [b"half a file"]
    assert not progress.exists()


def test_results_pngs_decode_with_pillow_to_the_test_images(evaluated_root, test_data):
    assert run_here("infer", "--root", str(evaluated_root), "--threshold", "0", "--count", "8").returncode == 0
    images = data.load_split(test_data, "test", None).images
    predictions = json.loads((evaluated_root / "results" / "predictions.json").read_text())["predictions"]
    for entry in predictions:
        with Image.open(evaluated_root / "results" / entry["file"]) as png:
            assert png.format == "PNG" and png.mode == "L" and png.size == (28, 28)
            assert png.tobytes() == bytes(images[entry["test_index"]].flatten().tolist())


def test_train_evaluate_and_infer_started_at_once_end_with_the_new_checkpoint(evaluated_root, short_trained_root):
    """`docker compose up` without Docker: the old checkpoint is already evaluated when all three start.

    The grace is long, as on a slow machine; the new checkpoint and its evaluation are new work,
    taken at once (a wait for the whole grace would end in the timeout)."""
    shutil.rmtree(evaluated_root / "data")  # the test split alone: train needs all four files
    private_copy(short_trained_root / "data", evaluated_root / "data")
    # a resumed train keeps its checkpoint's recipe: a 20-step one, so that the new epoch is short
    state = untrained_state()
    state["train_config"]["max_steps"] = 20
    write_evaluated(evaluated_root, state)
    root = str(evaluated_root)
    # train in a new interpreter, which takes its lock before torch loads; evaluate and infer forked, ready at once:
    # a harder race for that lock than three new interpreters
    processes = [start_mnist("train", "--root", root, fresh=True),
                 start_mnist("evaluate", "--root", root, "--grace", "600"),
                 start_mnist("infer", "--root", root, "--grace", "600", "--threshold", "0")]
    try:
        errors = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0, 0], [err[-2000:] for err in errors]
    sha = hashlib.sha256((evaluated_root / "model" / "mnist_cnn.pt").read_bytes()).hexdigest()
    evaluation = json.loads((evaluated_root / "model" / "eval_results.json").read_text())
    assert evaluation["checkpoint"] == {**evaluation["checkpoint"], "sha256": sha, "epoch": 1}
    assert json.loads((evaluated_root / "results" / "predictions.json").read_text())["checkpoint"]["sha256"] == sha
