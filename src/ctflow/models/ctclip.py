"""Extract CT-CLIP's text tower (a CXR-BERT) into a transformers folder in safetensors.

CT-CLIP checkpoints are PyTorch pickles holding the whole CLIP model; the text
transformer's weights sit under the ``text_transformer.`` prefix with BertModel
key names. We load them with ``torch.load(weights_only=True)`` (tensors only,
never arbitrary objects), infer the BERT configuration from the shapes and write
``config.json`` + ``model.safetensors`` (+ the tokenizer if one is given).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ctflow.errors import CTFlowError, check_whole
from ctflow.files import atomic_dir, check_folder_output

PREFIX = "text_transformer."


def _load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if checkpoint.is_dir():
        raise CTFlowError(f"checkpoint {checkpoint} is a folder; pass the CT-CLIP .pt file")
    if not checkpoint.is_file():
        raise CTFlowError(f"checkpoint {checkpoint} not found")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        if "Weights only load failed" in detail:  # torch's own advice, to unpickle it, is not ctflow's
            detail = "it holds Python objects besides tensors, which ctflow never unpickles"
        raise CTFlowError(
            f"cannot read {checkpoint} as a weights-only checkpoint ({type(e).__name__}: {detail});"
            " pass CT-CLIP's own .pt file, as downloaded"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CTFlowError(f"{checkpoint} does not hold a state dict")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CTFlowError(
            f"{checkpoint}: {odd[0]} is a {type(obj[odd[0]]).__name__}, not a tensor; is this a CT-CLIP checkpoint?"
        )
    return obj


def _converted_file(path: Path) -> bool:
    """Whether ``path`` is one of the files a conversion writes (so --overwrite may replace it)."""
    return path.is_file() and (
        path.name in ("config.json", "model.safetensors")
        or path.name.startswith(("tokenizer", "vocab", "special_tokens"))
    )


def _tokenizer_files(tokenizer: str | Path | None) -> list[Path]:
    """The tokenizer files of ``tokenizer`` (a folder) to copy beside the converted weights."""
    if tokenizer is None:
        return []
    tok = Path(tokenizer)
    if not tok.is_dir():
        raise CTFlowError(f"tokenizer folder {tok} not found")
    files = [
        f
        for f in tok.iterdir()
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")) and f.is_file()
    ]
    if not files:
        raise CTFlowError(
            f"tokenizer folder {tok} holds no tokenizer files (tokenizer.json, vocab.txt, ...); pass"
            " CXR-BERT's tokenizer folder"
        )
    return files


def bert_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        if key in state and state[key].ndim != 2:
            raise CTFlowError(
                f"checkpoint text tower's {key} is {tuple(state[key].shape)}, not a 2-D embedding table;"
                " is this a CT-CLIP checkpoint?"
            )
    try:
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        max_pos = state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CTFlowError(f"checkpoint text tower lacks {e.args[0]}; is this a CT-CLIP checkpoint?") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, int(hidden) // 64),
        "intermediate_size": int(intermediate),
        "max_position_embeddings": int(max_pos),
        "type_vocab_size": int(type_vocab),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def convert_ctclip(
    checkpoint: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    num_attention_heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write CT-CLIP's text transformer as a transformers BertModel folder."""
    from transformers import BertConfig, BertModel

    tokenizer_files = _tokenizer_files(tokenizer)  # checked before any work, as --out is
    inputs = [checkpoint, *([tokenizer] if tokenizer is not None else [])]
    check_folder_output(out, overwrite, _converted_file, inputs, what="a converted text encoder")
    state = _load_state_dict(Path(checkpoint))
    text = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not text:
        raise CTFlowError(f"no '{PREFIX}*' keys in {checkpoint}; expected a CT-CLIP checkpoint")
    text = {k.removeprefix("bert."): v for k, v in text.items()}
    cfg = bert_config_from_state_dict(text)
    hidden = cfg["hidden_size"]
    if num_attention_heads is not None:
        check_whole("--num-attention-heads", num_attention_heads, 1)
        cfg["num_attention_heads"] = num_attention_heads
    elif hidden % 64:  # BERT's heads are 64 wide; another width cannot be read from the weights
        raise CTFlowError(
            f"cannot tell the attention heads of a {hidden}-wide text tower; pass --num-attention-heads"
        )
    if hidden % cfg["num_attention_heads"]:
        raise CTFlowError(f"{cfg['num_attention_heads']} attention heads do not divide the width {hidden}")
    model = BertModel(BertConfig(**cfg), add_pooling_layer=any(k.startswith("pooler.") for k in text))
    expected = model.state_dict()
    text = {k: v for k, v in text.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(text) - {"embeddings.position_ids"})
    if missing:
        raise CTFlowError(f"text tower in {checkpoint} lacks {len(missing)} weights, e.g. {missing[0]}")
    unexpected = sorted(set(text) - set(expected))
    if unexpected:  # weights a BERT does not have: not a tower this converter understands
        raise CTFlowError(
            f"text tower in {checkpoint} has {len(unexpected)} weights a BERT does not, e.g. {unexpected[0]}"
        )
    wrong = [k for k, v in text.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CTFlowError(
            f"text tower in {checkpoint}: {wrong[0]} is {tuple(text[wrong[0]].shape)}, a BERT of its size"
            f" needs {tuple(expected[wrong[0]].shape)}"
        )
    model.load_state_dict(text, strict=False)  # (only position_ids, a buffer, may be absent)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in tokenizer_files:
            shutil.copy(f, tmp / f.name)
    return Path(out)
