"""The ctflow web app: type a report, watch the volume appear, download the NIfTI.

``ctflow app`` (or :func:`launch`) serves a gradio page on your machine. It
works offline: analytics are off and nothing is fetched from the internet.

* The model is loaded once and shared by every visitor. The pipeline is not
  thread-safe, so generations run one at a time behind a lock; the gradio queue
  (``max_queue`` waiting requests, ``concurrency`` workers) holds the rest and
  tells each visitor their place.
* Streaming: generation runs in a worker thread. The pipeline's step callback
  reports progress, and its ``on_chunk`` callback hands the slices each decoded
  chunk adds (already trimmed at the end of scan) to the page, which redraws
  the tri-planar preview of the volume so far after each chunk. A visitor who
  leaves cancels their generation at the next step.
* The finished volume is written by :func:`ctflow.generate.generate_one`
  (NIfTI marked SYNTHETIC, preview PNG, JSON sidecar) into a temporary folder;
  job folders older than an hour are deleted.
* API: the ``generate`` endpoint (``gradio_client.Client(url).predict(report,
  slices, steps, guidance, seed, api_name="/generate")``) returns the preview
  PNG path, the NIfTI path, the status line and the JSON sidecar's path.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import atexit  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from ctflow.data.io import read_volume  # noqa: E402
from ctflow.data.preview import LUNG_WINDOW, MEDIASTINAL_WINDOW, apply_window, triplanar_image  # noqa: E402
from ctflow.data.volume import Volume  # noqa: E402
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.generate import GenerationSettings, generate_one, output_paths  # noqa: E402
from ctflow.models.text import meta_problem, parse_meta  # noqa: E402

log = logging.getLogger("ctflow.app")

DISCLAIMER = "SYNTHETIC — not for clinical use"
APP_MAX_SLICES = 512  # per request; the CLI allows more
APP_MAX_STEPS = 100  # the steps slider's range
APP_MAX_GUIDANCE = 10  # the guidance slider's range (the CLI and the library take up to 100)
MAX_REPORT_CHARS = 20_000
MAX_SEED = 2**32 - 1
JOB_MAX_AGE_S = 3600
WINDOWS = {"lung": LUNG_WINDOW, "mediastinal": MEDIASTINAL_WINDOW}
END_REASONS = {
    "eos": "ended by the model (end of scan)",
    "num_slices": "reached the requested slice count",
    "max_slices": "reached the slice limit",
}
EXAMPLE_REPORTS = [
    "Findings: Trachea and both main bronchi are open. Mediastinal structures are of normal width. "
    "Heart size is enlarged. No pericardial effusion. Left-sided pleural effusion is present, with "
    "dependent fluid at the left lung base. A 14 mm nodule is seen in the upper lobe of the right lung. "
    "No consolidation. Bone structures are intact.\n"
    "Impressions: Cardiomegaly. Left pleural effusion. Right upper lobe nodule.",
    "Findings: Trachea and both main bronchi are open. Heart size is normal. No pleural or pericardial "
    "effusion. Both lungs are clear; no nodule or consolidation. Bone structures are intact.\n"
    "Impressions: Normal chest CT.",
    "Findings: Heart size is normal. Right-sided pleural effusion is present. Consolidation in the lower "
    "lobe of the left lung. No nodule.\n"
    "Impressions: Right pleural effusion. Left lower lobe consolidation.",
]
APP_CSS = """
#ctflow-preview img, #ctflow-axial img {
    image-rendering: pixelated; object-fit: contain !important;
    width: 100% !important; height: auto !important; max-height: none !important;
}
#ctflow-preview .image-frame, #ctflow-axial .image-frame { width: 100% !important; }
#ctflow-disclaimer, #ctflow-disclaimer * { color: #b91c1c !important; }
"""
# pass these to demo.launch(...) too: page style, footer, no run history (it offers cloud storage)
LAUNCH_OPTIONS = {"css": APP_CSS, "footer_links": ["api"], "run_history": False}


class _Cancelled(Exception):
    """The visitor left; stop generating."""


# ------------------------------------------------------------------------- inputs
def _whole(value, name: str, lo: int, hi: int, optional: bool = False) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise CTFlowError(f"{name} is required (a whole number from {lo} to {hi})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CTFlowError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise CTFlowError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    if not lo <= number <= hi:
        raise CTFlowError(f"{name} must be between {lo} and {hi}, got {int(number)}")
    return int(number)


def parse_inputs(report, slices, steps, guidance, seed) -> tuple[str, GenerationSettings]:
    """Check the form's values; bad ones raise CTFlowError with a one-line message."""
    if not isinstance(report, str) or not report.strip():
        raise CTFlowError("the report is empty; type the Findings/Impressions text to generate from")
    if len(report) > MAX_REPORT_CHARS:
        raise CTFlowError(f"the report is too long ({len(report)} characters; at most {MAX_REPORT_CHARS})")
    # 0 is blank: gradio's number box shows and sends 0 when left empty
    num_slices = _whole(None if slices in (0, "0") else slices, "slices", 1, APP_MAX_SLICES, optional=True)
    if problem := meta_problem(report):  # before the job starts, as the form's own values are
        raise CTFlowError(problem)
    asked = parse_meta(report)[0]
    if num_slices is None and asked is not None and not 1 <= asked <= APP_MAX_SLICES:
        raise CTFlowError(
            f"the report's meta line asks for {asked} slices; this app makes 1 to {APP_MAX_SLICES}"
        )
    num_steps = _whole(steps, "steps", 1, APP_MAX_STEPS)
    try:
        scale = float(guidance)
    except (TypeError, ValueError):
        raise CTFlowError(
            f"guidance must be a number from 0 to {APP_MAX_GUIDANCE}, got {guidance!r}"
        ) from None
    if not math.isfinite(scale) or not 0 <= scale <= APP_MAX_GUIDANCE:
        raise CTFlowError(f"guidance must be a number from 0 to {APP_MAX_GUIDANCE}, got {guidance!r}")
    seed_value = _whole(seed, "seed", 0, MAX_SEED, optional=True)
    if seed_value is None:
        seed_value = secrets.randbelow(2**31)
    settings = GenerationSettings(num_slices=num_slices, steps=num_steps, guidance=scale, seed=seed_value)
    settings.check()
    return report.strip(), settings


# ------------------------------------------------------------------------- streaming
def partial_volume(pipe, chunks: list[np.ndarray], report: str, num_slices: int | None) -> Volume | None:
    """The volume so far from the HU slices the pipeline's ``on_chunk`` gave, at the spacing the
    finished volume will have (:meth:`~ctflow.pipeline.CTFlowPipeline.slice_spacing_for`)."""
    if not sum(len(c) for c in chunks):
        return None
    px = float(pipe.config["pixel_spacing"])
    spacing = (pipe.slice_spacing_for(report, num_slices), px, px)
    return Volume(np.concatenate(chunks, axis=0), spacing)


def temp_folder(prefix: str) -> str:
    """A new temporary folder of the app's own, removed when the process exits (SIGTERM included)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _status(text):
    """A generate update that changes the status line alone (the preview, files and result stay)."""
    return gr.skip(), gr.skip(), text, gr.skip(), gr.skip()


class Job:
    """One generation, run in a worker thread; its events arrive on ``self.events``."""

    def __init__(self, service: GenerationService, report: str, settings: GenerationSettings):
        self.service, self.report, self.settings = service, report, settings
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.folder = service.new_job_folder()
        # the job's own name beside the seed: a browser renames a second download of the same name,
        # and the sidecar's record of its NIfTI would then name another volume
        self.out = self.folder / f"ctflow-seed{settings.seed}-{self.folder.name.removeprefix('job-')}.nii.gz"
        self.thread = threading.Thread(target=self._work, name="ctflow-generate", daemon=True)

    def start(self) -> Job:
        self.service.jobs.add(self)
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def _check(self):
        if self.cancelled.is_set():
            raise _Cancelled()

    def _on_step(self, chunk: int, step: int, total: int) -> None:
        self._check()
        self.events.put(("step", chunk, step, total))

    def _on_chunk(self, item: int, slices: np.ndarray) -> None:
        self._check()
        self.events.put(("chunk", slices))  # the pipeline's own array: it never changes it again

    def _work(self) -> None:
        try:
            if self.service.lock.locked():
                self.events.put(("waiting",))
            with self.service.lock:
                self._check()
                self.events.put(("started",))
                sidecar = generate_one(
                    self.service.pipe,
                    self.report,
                    self.out,
                    self.settings,
                    progress=self._on_step,
                    on_chunk=self._on_chunk,
                )
            axial = self.folder / "axial.npy"  # what the slice scroller reads, one slice at a time
            np.save(axial, np.clip(read_volume(self.out).hu(), -1024, 3071).astype(np.int16))
            files = {k: str(v) for k, v in output_paths(self.out).items()} | {"axial": str(axial)}
            self.events.put(("done", sidecar, files))
        except _Cancelled:
            self.events.put(("cancelled",))
            shutil.rmtree(self.folder, ignore_errors=True)
        except BaseException as e:  # reported to the visitor as one line
            if not isinstance(e, CTFlowError):
                log.exception("generation failed")
            shutil.rmtree(self.folder, ignore_errors=True)  # nothing of a failed job is served
            self.events.put(("error", e))
        finally:
            self.service.jobs.discard(self)


class GenerationService:
    """The shared model, its lock and the output folder."""

    def __init__(self, pipe, out_root: Path | None = None):
        self.pipe = pipe
        self.lock = threading.Lock()
        if out_root is None:  # ours: removed when the process exits
            out_root = temp_folder("ctflow-app-")
        self.out_root = Path(out_root)
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.jobs: set[Job] = set()  # running
        # registered after the temp folders, so it runs before their removal (atexit is last in, first
        # out): a stopped app cancels its generation and waits for it, instead of aborting inside torch
        # ("terminate called without an active exception") or writing into a removed folder
        atexit.register(self.stop_jobs)

    def stop_jobs(self, timeout: float = 60.0) -> None:
        """Cancel every running generation and wait (up to ``timeout`` s each) for it to stop."""
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        for job in jobs:
            job.thread.join(timeout)

    def new_job_folder(self) -> Path:
        now = time.time()
        for old in self.out_root.glob("job-*"):
            try:
                if now - old.stat().st_mtime > JOB_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix="job-", dir=self.out_root))

    # -- the gradio handlers
    def generate(self, report, slices, steps, guidance, seed, progress=gr.Progress()):  # noqa: B008
        """Stream (preview image, NIfTI file, status, JSON sidecar, result state) while generating."""
        try:
            report, settings = parse_inputs(report, slices, steps, guidance, seed)
            if settings.num_slices is None:  # the pipeline's own limit lies a chunk past a meta line's count
                settings.max_slices = min(APP_MAX_SLICES, self.pipe.scan_limit(report))
        except CTFlowError as e:
            # the toast fades: the status says it, and no earlier result stays as if it were this form's
            yield None, None, f"Refused: {e}", None, None
            raise gr.Error(str(e), print_exception=False) from None
        job = Job(self, report, settings).start()
        expected = self.pipe.expected_chunks(report, settings.num_slices)  # for the progress bar
        chunks: list[np.ndarray] = []  # HU slices so far, as the pipeline trimmed them
        limit = settings.num_slices
        last_status, shown = 0.0, 0
        try:
            yield None, None, "Starting…", None, None
            while True:
                try:
                    events = [job.events.get(timeout=1.0)]
                except queue.Empty:
                    if not job.thread.is_alive() and job.events.empty():
                        raise gr.Error("generation stopped unexpectedly", print_exception=False) from None
                    # hand control back while nothing happens (waiting for the lock, decoding, writing):
                    # a visitor's cancel reaches this generator only when it yields
                    yield _status(gr.skip())
                    continue
                while True:
                    try:
                        events.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                new_chunk, step, final = False, None, None
                for event in events:
                    if event[0] == "chunk":
                        chunks.append(event[1])
                        new_chunk = True
                    elif event[0] == "step":
                        step = event[1:]
                    elif event[0] == "waiting":
                        yield _status("Waiting for another generation to finish…")
                    elif event[0] == "started":
                        yield _status("Generating…")
                    elif event[0] in ("done", "error", "cancelled"):
                        final = event
                if final is not None:
                    break
                if step is not None:
                    chunk, k, total = step  # the bar covers the whole volume, as the CLI's does
                    n = max(expected, chunk + 1)
                    progress((chunk * total + k + 1, n * total), desc=f"chunk {chunk + 1}/{n}", unit="steps")
                if new_chunk and (volume := partial_volume(self.pipe, chunks, report, limit)) is not None:
                    shown = volume.num_slices
                    text = f"Generating… {shown} slices so far" + (f" of {limit}" if limit else "")
                    yield triplanar_image(volume), gr.skip(), f"{text} · {DISCLAIMER}", gr.skip(), gr.skip()
                    last_status = time.monotonic()
                elif step is not None and time.monotonic() - last_status > 0.5:
                    text = f"Generating chunk {chunk + 1}, step {k + 1}/{total}"
                    if shown:
                        text += f" · {shown} slices so far"
                    yield _status(text)
                    last_status = time.monotonic()
            if final[0] == "error":
                error = final[1]
                message = (
                    str(error)
                    if isinstance(error, CTFlowError)
                    else f"generation failed: {str(error) or type(error).__name__}"
                )
                yield _status(f"Failed: {message}")  # the toast fades; this stays
                raise gr.Error(message, print_exception=False)
            if final[0] == "cancelled":
                raise gr.Error("generation was cancelled", print_exception=False)
            sidecar, files = final[1], final[2]
            status = (
                f"{sidecar['num_slices']} slices · {END_REASONS.get(sidecar['end_reason'], sidecar['end_reason'])}"
                f" · {sidecar['seconds']:.1f} s · seed {sidecar['seed']}"
                + (f" · {note}" if (note := sidecar.get("warning")) else "")  # a cut report among them
                + f" · {DISCLAIMER}"
            )
            result = {"num_slices": sidecar["num_slices"], "axial": files["axial"]}
            # the sidecar is an output of the API too: a client's NIfTI comes with its record
            yield files["preview"], files["nifti"], status, files["sidecar"], result
        finally:
            job.cancel()

    @staticmethod
    def axial_slice(result, index, window):
        """One axial slice (1-based index) of the finished volume in a display window."""
        if not result:
            return None
        try:
            volume = np.load(result["axial"], mmap_mode="r")
        except FileNotFoundError:  # job folders older than an hour are removed
            raise gr.Error("this result has expired; generate it again", print_exception=False) from None
        i = min(max(int(index or 1), 1), volume.shape[0]) - 1
        return apply_window(np.asarray(volume[i], dtype=np.float32), WINDOWS.get(window, LUNG_WINDOW))

    def scroll(self, result, index, window):
        """The slider or the window moved: (the axial slice, the status), the status saying when the
        result has expired (an error raised by these quick events is not shown on the page)."""
        try:
            return self.axial_slice(result, index, window), gr.skip()
        except gr.Error:
            return None, "This result has expired (results are kept an hour); generate it again"

    def show_result(self, result, window):
        """After a generation: set up the slice scroller."""
        if not result:
            return gr.update(), None
        n = int(result["num_slices"])
        middle = (n + 1) // 2
        slider = gr.update(minimum=1, maximum=max(n, 2), value=middle, interactive=n > 1)
        return slider, self.axial_slice(result, middle, window)


# ------------------------------------------------------------------------- the page
def build_app(pipe=None, max_queue: int = 8, concurrency: int = 1, out_dir=None) -> gr.Blocks:
    """The gradio page around ``pipe`` (default: the embedded model), queued and ready to launch.

    Outputs go to ``out_dir`` (default: a temporary folder removed at exit). gradio serves files
    only from the working folder and the system's temporary one: launch with
    ``allowed_paths=[out_dir]`` when ``out_dir`` lies elsewhere.
    """
    if max_queue < 1:
        raise CTFlowError(f"max_queue must be at least 1, got {max_queue}")
    if concurrency < 1:
        raise CTFlowError(f"concurrency must be at least 1, got {concurrency}")
    if pipe is None:
        from ctflow.pipeline import CTFlowPipeline

        pipe = CTFlowPipeline.from_pretrained(None)
    service = GenerationService(pipe, out_dir)
    name = getattr(pipe, "name", "ctflow")
    with gr.Blocks(title="ctflow — report to chest CT", delete_cache=(3600, JOB_MAX_AGE_S)) as demo:
        gr.Markdown(
            f"## ctflow — radiology report to 3D chest CT\n"
            f"Type a report, press **Generate** and watch the volume grow chunk by chunk. "
            f"Model: `{name}`."
        )
        gr.Markdown(f"**{DISCLAIMER}.** Generated volumes are synthetic images.", elem_id="ctflow-disclaimer")
        with gr.Row():
            with gr.Column(scale=5):
                report = gr.Textbox(
                    label="Radiology report (Findings / Impressions)",
                    value=EXAMPLE_REPORTS[0],
                    lines=8,
                    max_lines=20,
                    elem_id="ctflow-report",
                )
                with gr.Row():
                    slices = gr.Number(
                        label="Slices (0 or blank: the model decides)",  # an empty box shows and sends 0
                        value=None,
                        precision=None,  # not rounded: parse_inputs refuses 40.5 rather than make 40
                        elem_id="ctflow-slices",
                    )
                    seed = gr.Number(
                        label="Seed (a new one each time the page loads; blank: random)",
                        # drawn at each page load: an empty box shows and sends 0, seed 0 for every visitor
                        value=lambda: secrets.randbelow(2**31),
                        precision=None,
                        elem_id="ctflow-seed",
                    )
                with gr.Row():
                    steps = gr.Slider(
                        1, APP_MAX_STEPS, value=20, step=1, label="Steps per chunk", elem_id="ctflow-steps"
                    )
                    guidance = gr.Slider(
                        0, APP_MAX_GUIDANCE, value=2.0, step=0.1, label="Guidance", elem_id="ctflow-guidance"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="ctflow-generate")
                gr.Examples(EXAMPLE_REPORTS, inputs=[report], label="Example reports")
                nifti = gr.File(label="NIfTI volume", interactive=False, elem_id="ctflow-nifti")
                sidecar = gr.File(label="JSON sidecar", interactive=False, elem_id="ctflow-sidecar")
            with gr.Column(scale=7):
                preview = gr.Image(
                    label="Tri-planar preview: axial, coronal, sagittal (lung window top, mediastinal bottom)",
                    type="filepath",
                    format="png",
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="ctflow-preview",
                )
                status = gr.Textbox(label="Status", interactive=False, elem_id="ctflow-status")
                with gr.Row():
                    with gr.Column(scale=1):
                        slider = gr.Slider(
                            1,
                            2,
                            value=1,
                            step=1,
                            label="Axial slice",
                            interactive=False,
                            elem_id="ctflow-slice",
                        )
                        window = gr.Radio(
                            list(WINDOWS), value="lung", label="Window", elem_id="ctflow-window"
                        )
                    with gr.Column(scale=1):
                        axial = gr.Image(
                            label="Axial slice",
                            format="png",  # lossless: gradio's default WebP moved grey levels by up to 18
                            interactive=False,
                            buttons=["download", "fullscreen"],
                            elem_id="ctflow-axial",
                        )
        result = gr.State(None)

        # a new request clears the last result's slice view (its slider too, which went on over the old range)
        button.click(
            lambda: (None, None, gr.update(value=1, maximum=2, interactive=False)),
            outputs=[axial, sidecar, slider],
            queue=False,
            api_visibility="private",
        )
        event = button.click(
            service.generate,
            inputs=[report, slices, steps, guidance, seed],
            outputs=[preview, nifti, status, sidecar, result],
            api_name="generate",
            show_progress="full",
            show_progress_on=[status],
        )
        event.success(
            service.show_result,
            inputs=[result, window],
            outputs=[slider, axial],
            api_visibility="private",
            show_progress="hidden",
            queue=False,
        )
        for trigger in (slider.input, window.input):
            trigger(
                service.scroll,
                inputs=[result, slider, window],
                outputs=[axial, status],
                api_visibility="private",
                show_progress="hidden",
                trigger_mode="always_last",
                queue=False,
            )
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.ctflow_service = service
    return demo


def check_address(host: str, port: int) -> None:
    """Refuse an address the app cannot serve on, naming what is wrong: a host that is not a name or
    an address of this machine, a port in use, an IPv6 address (gradio's start-up check cannot reach
    one: it ended in a traceback)."""
    import errno
    import socket

    if re.fullmatch(r"[^:]+:\d+", host):  # "127.0.0.1:7860"
        raise CTFlowError(f"--host {host}: give the host alone and the port with --port")
    if ":" in host:
        raise CTFlowError(
            f"--host {host}: IPv6 addresses are not served; use 127.0.0.1, 0.0.0.0 or a host name"
        )
    try:
        address = socket.getaddrinfo(host or "127.0.0.1", port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError) as e:
        raise CTFlowError(
            f"--host {host} is not an address or host name this machine knows ({getattr(e, 'strerror', e)});"
            " use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        ) from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CTFlowError(f"port {port} on {host} is in use; pick another --port") from None
            raise CTFlowError(
                f"cannot serve on {host}:{port}: {e.strerror}; use an address of this machine (127.0.0.1,"
                " 0.0.0.0) and a free --port"
            ) from None


def launch(
    host: str = "127.0.0.1", port: int = 7860, model=None, share: bool = False, device=None, dtype=None
):
    """Load the model once (on ``device``, its weights in ``dtype``) and serve the app until interrupted."""
    if not 1 <= int(port) <= 65535:
        raise CTFlowError(f"--port must be between 1 and 65535, got {port}")
    check_address(host, int(port))  # before the model loads; gradio calls every failure "no empty port"
    from ctflow.pipeline import CTFlowPipeline

    pipe = CTFlowPipeline.from_pretrained(model).to(device, dtype)
    if "GRADIO_TEMP_DIR" not in os.environ:
        # gradio keeps a copy of every file it serves (each volume, each streamed preview) in its
        # cache folder, which outlives a server that is stopped: ours goes at exit with the outputs
        os.environ["GRADIO_TEMP_DIR"] = temp_folder(
            "ctflow-gradio-"
        )  # read as the page's components are built
    demo = build_app(pipe)
    if threading.current_thread() is threading.main_thread():
        # a service manager stops the app with SIGTERM: exit as on Ctrl-C, so the output folder (an
        # atexit clean-up) goes too instead of staying in the temp folder with every volume made
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.launch(server_name=host, server_port=int(port), share=share, **LAUNCH_OPTIONS)
    except OSError as e:
        if "empty port" in str(e):
            raise CTFlowError(f"port {port} on {host} is in use; pick another --port") from None
        raise CTFlowError(f"cannot serve on {host}:{port}: {str(e).splitlines()[0]}") from None
    return demo
