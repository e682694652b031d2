"""The web app, served on a free local port and driven through gradio_client."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("gradio", reason="the web app needs the 'app' extra: pip install -e '.[app]'")
pytest.importorskip("gradio_client")

import gradio as gr  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

from ctflow.app import LAUNCH_OPTIONS, build_app, parse_inputs  # noqa: E402
from ctflow.data.io import read_volume  # noqa: E402
from ctflow.data.volume import Volume  # noqa: E402
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.pipeline import CTFlowOutput  # noqa: E402
from tests.conftest import assert_clean_error  # noqa: E402
from tests.tiny_pipeline import tiny_pipeline  # noqa: E402

REPORT = "Findings: Heart size is enlarged. Left-sided pleural effusion. Impressions: Cardiomegaly."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(demo):
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **LAUNCH_OPTIONS,
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    demo = build_app(tiny_pipeline(), max_queue=8, concurrency=1, out_dir=tmp_path_factory.mktemp("app"))
    with served(demo) as url:
        yield demo, url


def client(url, folder) -> Client:
    return Client(url, verbose=False, download_files=str(folder))


class FakePipe:
    """Returns a flat volume once released; records how many calls ran at once."""

    name, weights_hash, chunk_slices = "fake", None, 4
    device, dtype = torch.device("cpu"), torch.float32
    config = {"slice_spacing": 2.0, "pixel_spacing": 1.5}

    def __init__(self, delay=0.0):
        self.release, self.started = threading.Event(), threading.Event()
        self.delay, self.active, self.max_active, self.calls = delay, 0, 0, 0
        self._lock = threading.Lock()

    def finding_flags(self, text):  # a model that reads no finding flags
        return None

    def scan_limit(self, report):  # as the pipeline's: a chunk of 4 past a meta line's count, else 160
        from ctflow.models.text import parse_meta

        return max(160, (parse_meta(report)[0] or 0) + 4)

    def expected_chunks(self, report, num_slices=None):
        return 1

    def untrained_count(self, text, num_slices=None):  # trained on every count
        return None

    def __call__(self, report, num_slices=None, callback=None, **_):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.started.set()
            assert self.release.wait(30)
            time.sleep(self.delay)
            if callback:
                callback(0, 0, 1)
            reports = [report] if isinstance(report, str) else list(report)  # as the pipeline takes them
            counts = num_slices if isinstance(num_slices, list) else [num_slices] * len(reports)
            volumes = [
                Volume(
                    np.full((n or 4, 16, 16), -1000.0, np.float32), (2.0, 1.5, 1.5), None, {"synthetic": True}
                )
                for n in counts
            ]
            return CTFlowOutput(volumes, ["num_slices"] * len(reports), reports, [0] * len(reports))
        finally:
            with self._lock:
                self.active -= 1


# ----------------------------------------------------------------------------- end to end
def test_generate_endpoint_streams_and_writes_files(tiny_app, tmp_path):
    _, url = tiny_app
    job = client(url, tmp_path).submit(REPORT, 10, 2, 2.0, 7, api_name="/generate")
    preview, nifti, status, sidecar = job.result(timeout=60)
    updates = job.outputs()
    partial_previews = [o[0] for o in updates[:-1] if isinstance(o[0], str) and o[0].endswith(".png")]
    assert len(partial_previews) >= 2, updates  # 10 slices = 3 chunks of 4: a preview after each
    assert Path(preview).is_file() and Path(preview).suffix == ".png"
    assert Path(nifti).is_file() and nifti.endswith(".nii.gz")
    volume = read_volume(nifti)
    assert volume.num_slices == 10 and volume.synthetic
    assert "SYNTHETIC" in status and "10 slices" in status and "seed 7" in status
    # an API client gets the sidecar too (it was handed out only to the page), naming this NIfTI
    record = json.loads(Path(sidecar).read_text())
    assert record["seed"] == 7 and record["num_slices"] == 10 and record["files"]["nifti"] == Path(nifti).name


def test_bad_input_is_a_clear_error_not_a_crash(tiny_app, tmp_path):
    _, url = tiny_app
    c = client(url, tmp_path)
    with pytest.raises(AppError, match="report is empty"):
        c.predict("   ", None, 2, 2.0, 0, api_name="/generate")
    with pytest.raises(AppError, match="slices must be between 1 and"):
        c.predict(REPORT, -3, 2, 2.0, 0, api_name="/generate")
    with pytest.raises(AppError, match="less than minimum value 1"):  # the steps slider checks its range
        c.predict(REPORT, 4, 0, 2.0, 0, api_name="/generate")
    with pytest.raises(AppError, match="seed must be"):
        c.predict(REPORT, 4, 2, 2.0, -5, api_name="/generate")
    for slices, seed in ((4.5, 0), (4, 1.5)):  # were rounded to 4 (or 5) and 2 without a word
        with pytest.raises(AppError, match="must be a whole number"):
            c.predict(REPORT, slices, 2, 2.0, seed, api_name="/generate")
    preview, nifti, status, _ = c.predict(REPORT, 4, 1, 1.0, None, api_name="/generate")  # still serving
    assert read_volume(nifti).num_slices == 4 and "SYNTHETIC" in status and "truncated" not in status
    # a report longer than the encoder reads is generated, and the status line says so, once
    with pytest.warns(UserWarning, match="report truncated by"):  # (the server's log says it too)
        _, _, status, _ = c.predict(REPORT + " The lungs are clear." * 80, 4, 1, 1.0, 0, api_name="/generate")
    assert status.count("truncated by") == 1 and "to the encoder limit of" in status
    # a meta line the model would read as words, or one asking past the app's limit, is refused
    # before the job starts (the limit held only for the slices box)
    with pytest.raises(AppError, match="is not in the form 'Volume: N slices, d mm spacing.'"):
        c.predict("Volume: 80.5 slices. " + REPORT, None, 1, 1.0, 0, api_name="/generate")
    with pytest.raises(AppError, match="meta line asks for 2000 slices; this app makes 1 to"):
        c.predict("Volume: 2000 slices. " + REPORT, None, 1, 1.0, 0, api_name="/generate")


def test_eight_concurrent_clients_get_their_own_results(tiny_app, tmp_path):
    _, url = tiny_app
    results, errors = {}, []

    def visit(i):
        try:
            c = client(url, tmp_path / f"c{i}")
            results[i] = c.predict(f"{REPORT} Visitor {i}.", i, 1, 1.0, 100 + i, api_name="/generate")
        except Exception as e:  # reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(1, 9))
    for i, (_preview, nifti, status, _sidecar) in results.items():
        volume = read_volume(nifti)
        assert volume.num_slices == i, (i, nifti, status)
        assert f"{i} slices" in status and f"seed {100 + i}" in status and "SYNTHETIC" in status
        assert Path(nifti).name.startswith(f"ctflow-seed{100 + i}-") and nifti.endswith(".nii.gz")
    assert len({r[1] for r in results.values()}) == 8
    assert len({Path(r[1]).name for r in results.values()}) == 8  # each download named apart


def test_cancelled_generation_frees_the_model(tiny_app, tmp_path):
    demo, url = tiny_app
    c = client(url, tmp_path)
    job = c.submit(REPORT, 16, 100, 2.0, 4, api_name="/generate")
    deadline = time.monotonic() + 60
    while not any("step" in (o[2] or "") for o in job.outputs()):
        assert not job.done() and time.monotonic() < deadline, job.outputs()
        time.sleep(0.1)
    assert job.cancel()
    while demo.ctflow_service.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not demo.ctflow_service.lock.locked()  # the worker stopped at its next step
    _, nifti, _, _ = c.predict(REPORT, 2, 1, 1.0, 5, api_name="/generate")
    assert read_volume(nifti).num_slices == 2


def test_ui_helpers_scroll_axial_slices(tiny_app, tmp_path):
    demo, url = tiny_app
    service = demo.ctflow_service
    _, nifti, _, sidecar = client(url, tmp_path).predict(REPORT, 6, 1, 1.0, 3, api_name="/generate")
    jobs = sorted(service.out_root.glob("job-*/ctflow-seed3-*.nii.gz"), key=lambda p: p.stat().st_mtime)
    folder = jobs[-1].parent
    result = {"num_slices": 6, "axial": str(folder / "axial.npy")}
    slider, image = service.show_result(result, "lung")
    assert slider["maximum"] == 6 and slider["value"] == 3
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert json.loads(Path(sidecar).read_text())["num_slices"] == 6
    assert str(service.out_root) not in Path(sidecar).read_text()  # the download shows no server folder
    last = service.axial_slice(result, 99, "mediastinal")  # clamped to the last slice
    assert last.shape == (32, 32)
    assert service.axial_slice(None, 1, "lung") is None
    image, status = service.scroll(result, 2, "lung")
    assert image.shape == (32, 32) and status == gr.skip()
    shutil.rmtree(folder)  # as the hourly clean-up removes an old job's folder
    with pytest.raises(gr.Error, match="this result has expired; generate it again"):
        service.axial_slice(result, 1, "lung")
    # the page shows no error from the slider's quick event: the status line says it
    assert service.scroll(result, 1, "lung") == (
        None,
        "This result has expired (results are kept an hour); generate it again",
    )


def test_a_refused_form_clears_the_last_result_and_says_why(tmp_path):
    """The refusal's toast faded and the last volume's status and NIfTI stayed, as if for this form."""
    service = build_app(FakePipe(), out_dir=tmp_path / "out").ctflow_service
    updates = []
    with pytest.raises(gr.Error, match="slices must be between"):
        for update in service.generate(REPORT, 9999, 1, 1.0, 0, progress=lambda *a, **k: None):
            updates.append(update)
    assert updates == [(None, None, "Refused: slices must be between 1 and 512, got 9999", None, None)]


def test_a_meta_line_at_the_apps_limit_stops_there(tmp_path):
    """Left to the model, a scan asked for 512 slices may run a chunk past: the app's limit holds; a
    scan without a count keeps the model's own limit (not 512 for every form)."""
    seen = []

    class Recording(FakePipe):
        def __call__(self, report, num_slices=None, **kw):
            seen.append(kw.get("max_slices"))
            return super().__call__(report, num_slices=num_slices, **kw)

    pipe = Recording()
    pipe.release.set()
    service = build_app(pipe, out_dir=tmp_path / "out").ctflow_service
    for report, slices in (("Volume: 512 slices. " + REPORT, None), (REPORT, None), (REPORT, 6)):
        list(service.generate(report, slices, 1, 1.0, 0, progress=lambda *a, **k: None))
    assert seen == [512, 160, None]


def test_a_failed_generation_says_so_in_the_status_line(tmp_path):
    """The error's toast fades after 10 s; the status line stayed on 'Generating…'."""

    class FailingPipe(FakePipe):
        def __call__(self, *args, **kwargs):
            raise CTFlowError("the model folder lost its weights")

    service = build_app(FailingPipe(), out_dir=tmp_path / "out").ctflow_service
    statuses = []
    with pytest.raises(gr.Error, match="lost its weights"):
        for update in service.generate(REPORT, 4, 1, 1.0, 0, progress=lambda *a, **k: None):
            statuses.append(update[2])
    assert statuses[-1] == "Failed: the model folder lost its weights"


# ----------------------------------------------------------------------------- queue and lock
def test_an_untouched_form_lets_the_model_decide_and_draws_a_seed_per_page():
    """gradio's empty number box shows and sends 0: an untouched form was refused (0 slices) and every
    visitor who kept the seed box got seed 0."""
    assert parse_inputs("x", 0, 20, 2.0, 5)[1].num_slices is None  # 0: the model decides
    config = build_app(FakePipe()).config
    seed = next(c for c in config["components"] if c["props"].get("elem_id") == "ctflow-seed")
    # drawn again at each page load (a load event), not a fixed 0
    assert isinstance(seed["props"]["value"], int)
    assert any(target[1] == "load" for d in config["dependencies"] for target in d.get("targets") or [])


def test_queue_limits_are_configured():
    demo = build_app(FakePipe(), max_queue=5, concurrency=2)
    assert demo._queue.max_size == 5
    assert demo._queue.default_concurrency_limit == 2
    config = demo.config
    assert config["enable_queue"]
    generate = [d for d in config["dependencies"] if d["api_name"] == "generate"]
    assert len(generate) == 1 and generate[0]["queue"] and generate[0]["api_visibility"] == "public"
    with pytest.raises(CTFlowError, match="max_queue"):
        build_app(FakePipe(), max_queue=0)


def test_full_queue_rejects_new_requests(tmp_path):
    pipe = FakePipe()
    with served(build_app(pipe, max_queue=1, concurrency=1, out_dir=tmp_path / "out")) as url:
        c = client(url, tmp_path)
        first = c.submit(REPORT, 3, 1, 1.0, 1, api_name="/generate")
        assert pipe.started.wait(30)
        second = c.submit(REPORT, 4, 1, 1.0, 2, api_name="/generate")
        for _ in range(200):
            if second.status().code == Status.IN_QUEUE:
                break
            time.sleep(0.05)
        third = c.submit(REPORT, 5, 1, 1.0, 3, api_name="/generate")
        with pytest.raises(QueueError, match="(?i)queue is full"):
            third.result(timeout=30)
        pipe.release.set()
        assert read_volume(first.result(timeout=30)[1]).num_slices == 3
        assert read_volume(second.result(timeout=30)[1]).num_slices == 4
    assert pipe.calls == 2


def test_generations_are_serialized_even_with_parallel_workers(tmp_path):
    pipe = FakePipe(delay=0.2)
    pipe.release.set()
    with served(build_app(pipe, max_queue=8, concurrency=4, out_dir=tmp_path / "out")) as url:
        c = client(url, tmp_path)
        jobs = [c.submit(REPORT, n, 1, 1.0, n, api_name="/generate") for n in (2, 3, 4, 5)]
        counts = [read_volume(j.result(timeout=60)[1]).num_slices for j in jobs]
    assert counts == [2, 3, 4, 5]
    assert pipe.calls == 4 and pipe.max_active == 1


def test_a_failed_generation_is_one_line_and_leaves_no_job_folder(tmp_path):
    class Failing(FakePipe):
        def __call__(self, *args, **kwargs):
            raise MemoryError()  # an exception with no message of its own

    with served(build_app(Failing(), max_queue=2, concurrency=1, out_dir=tmp_path / "out")) as url:
        with pytest.raises(AppError, match="generation failed: MemoryError"):
            client(url, tmp_path).predict(REPORT, 3, 1, 1.0, 1, api_name="/generate")
    assert not list((tmp_path / "out").glob("job-*/*"))  # its half-written files are not kept


def test_streamed_previews_use_the_reports_slice_spacing():
    from ctflow.app import partial_volume

    pipe = tiny_pipeline()
    chunks = [np.full((4, 16, 16), -500.0, np.float32), np.full((2, 16, 16), 40.0, np.float32)]
    plain = partial_volume(pipe, chunks, "Findings: clear.", None)
    spaced = partial_volume(pipe, chunks, "Volume: 8 slices, 5 mm spacing. Findings: clear.", None)
    assert plain.spacing[0] == pipe.config["slice_spacing"] and spaced.spacing[0] == 5.0
    assert plain.num_slices == 6 and plain.hu()[-1].max() == 40.0  # the pipeline's HU slices, joined
    pipe.config["typical_extent_mm"] = 60.0  # the spacing the finished volume will have, from its count
    assert (
        partial_volume(pipe, chunks, "Findings: clear.", 12).spacing[0]
        == pipe.slice_spacing_for("x", 12)
        == 5
    )
    assert partial_volume(pipe, [np.zeros((0, 16, 16), np.float32)], "Findings: clear.", None) is None


# ----------------------------------------------------------------------------- inputs and CLI
def test_parse_inputs():
    report, s = parse_inputs("  Findings: normal.  ", None, 20, 2.0, None)
    assert report == "Findings: normal." and s.num_slices is None and 0 <= s.seed < 2**31
    _, s = parse_inputs("x", 12.0, "5", "1.5", 9)
    assert (s.num_slices, s.steps, s.guidance, s.seed) == (12, 5, 1.5, 9)
    for args, words in [
        (("", 4, 20, 2.0, 0), "report is empty"),
        (("x", 2.5, 20, 2.0, 0), "whole number"),
        (("x", -1, 20, 2.0, 0), "slices must be between"),
        (("x", 4, 20, float("nan"), 0), "guidance"),
        (("x", 4, 20, -1, 0), "guidance"),
        (("x", 4, 20, 11, 0), "guidance must be a number from 0 to 10"),  # the slider's range, not 100
        (("x", 4, None, 2.0, 0), "steps is required"),
        (("x", 4, 20, 2.0, -1), "seed"),
        (("x" * 30_000, 4, 20, 2.0, 0), "too long"),
    ]:
        with pytest.raises(CTFlowError, match=words):
            parse_inputs(*args)


def test_cli_app_errors(run_cli, monkeypatch):
    assert_clean_error(run_cli("app", "--port", "70000"), "port")
    # each address problem named as itself (gradio calls every one "cannot find empty port")
    assert_clean_error(run_cli("app", "--host", "nonexistent.invalid"), "--host nonexistent.invalid is not")
    assert_clean_error(run_cli("app", "--host", "::1"), "IPv6")  # a traceback from gradio's check
    assert_clean_error(run_cli("app", "--host", "127.0.0.1:80"), "the port with --port")  # was "IPv6"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_clean_error(run_cli("app", "--port", port), f"port {port} on 127.0.0.1 is in use")
    assert_clean_error(run_cli("app", "--device", "cuda"), "no CUDA GPU")
    assert_clean_error(run_cli("app", "--dtype", "half"), "--dtype")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else real(n, *a))
    assert_clean_error(run_cli("app"), "ctflow[app]")


@pytest.mark.slow
def test_the_served_app_removes_its_output_folder_when_stopped_with_sigterm(tmp_path):
    """A service manager stops the app with SIGTERM; its temporary output folder (every volume made)
    and gradio's cache of what it served go with it, as on Ctrl-C."""
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctflow.cli", "app", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # serving once the port answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "the app exited before serving"
            time.sleep(0.1)
        assert list(tmp_path.glob("ctflow-app-*"))  # its output folder exists while it serves
        # one volume made: gradio keeps copies of what it serves (the NIfTI, the previews) in its cache
        c = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path.parent / "dl"))
        c.predict(REPORT, 8, 1, 1.0, 0, api_name="/generate")
        # stopped in the middle of another: it cancels that one and exits cleanly (it aborted inside
        # torch, "terminate called without an active exception", in 4 of 5 tries)
        job = c.submit(REPORT, 120, 50, 2.0, 1, api_name="/generate")
        deadline = time.monotonic() + 120
        while not any("slices so far" in (o[2] or "") for o in job.outputs()):
            assert time.monotonic() < deadline, job.outputs()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmp_path.glob("ctflow-app-*")) and not list(tmp_path.glob("ctflow-gradio-*"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no copy of a volume left anywhere
