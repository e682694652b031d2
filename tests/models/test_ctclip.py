import torch
from transformers import BertConfig, BertModel

from ctflow.models.ctclip import convert_ctclip
from tests.conftest import assert_clean_error


class Arbitrary:
    """Unpickling this would run arbitrary code paths; weights_only must refuse it."""


def _fake_ctclip(path, add_pooler=True):
    """A checkpoint with CT-CLIP's key layout: text tower under text_transformer., plus other parts."""
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    bert = BertModel(cfg, add_pooling_layer=add_pooler).eval()
    state = {f"text_transformer.{k}": v for k, v in bert.state_dict().items()}
    state["visual_transformer.to_patch_emb.weight"] = torch.randn(8, 8)
    state["to_text_latent.weight"] = torch.randn(32, 64)
    torch.save(state, path)
    return bert


def test_convert_ctclip_writes_an_equivalent_safetensors_bert(tmp_path):
    bert = _fake_ctclip(tmp_path / "ctclip.pt")
    out = convert_ctclip(tmp_path / "ctclip.pt", tmp_path / "text", num_attention_heads=1)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    loaded = BertModel.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(loaded(ids).last_hidden_state, bert(ids).last_hidden_state)


def test_convert_ctclip_cli_refuses_a_checkpoint_without_text_tower(tmp_path, run_cli):
    torch.save({"visual.weight": torch.zeros(2)}, tmp_path / "x.pt")
    assert_clean_error(
        run_cli("convert", "ctclip", tmp_path / "x.pt", "--out", tmp_path / "o"), "text_transformer"
    )
    assert not (tmp_path / "o").exists()


def test_convert_ctclip_refuses_pickled_objects(tmp_path, run_cli):
    torch.save({"a": Arbitrary()}, tmp_path / "e.pt")  # an arbitrary object, not tensors
    result = run_cli("convert", "ctclip", tmp_path / "e.pt", "--out", tmp_path / "o")
    assert_clean_error(result, "weights-only", "never unpickles")
    assert "weights_only" not in result.error_line  # not torch's advice to load it unsafely
    assert not (tmp_path / "o").exists()


def test_convert_ctclip_overwrite_never_deletes_its_inputs_or_other_files(tmp_path, run_cli):
    _fake_ctclip(tmp_path / "ctclip.pt")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (tok / "pytorch_model.bin").write_bytes(b"the user's other weights")
    for out, named in ((tmp_path / "ctclip.pt", "ctclip.pt"), (tok, "tok"), (tmp_path, "ctclip.pt")):
        args = ("convert", "ctclip", tmp_path / "ctclip.pt", "--tokenizer", tok, "--out", out)
        assert_clean_error(
            run_cli(*args, "--num-attention-heads", 1, "--overwrite"), "holds the input", named
        )
    assert (tmp_path / "ctclip.pt").is_file() and (tok / "pytorch_model.bin").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    args = ("convert", "ctclip", tmp_path / "ctclip.pt", "--out", other, "--num-attention-heads", 1)
    assert_clean_error(run_cli(*args), "already exists")  # said before the checkpoint is read
    assert_clean_error(
        run_cli(*args, "--overwrite"), "more than a converted text encoder folder's", "notes.txt"
    )
    assert (other / "notes.txt").exists()
    done = tmp_path / "done"
    assert (
        run_cli("convert", "ctclip", tmp_path / "ctclip.pt", "--out", done, "--num-attention-heads", 1).code
        == 0
    )
    assert run_cli("convert", "ctclip", tmp_path / "ctclip.pt", "--out", done, "--num-attention-heads", 1,
                   "--overwrite").code == 0  # fmt: skip


def test_a_converted_text_tower_without_its_tokenizer_is_refused_when_loaded(tmp_path):
    """Without vocab files transformers builds a 5-token tokenizer that reads every word as [UNK]."""
    import pytest

    from ctflow.errors import CTFlowError
    from ctflow.models.text import load_text_encoder

    _fake_ctclip(tmp_path / "ctclip.pt")
    out = convert_ctclip(tmp_path / "ctclip.pt", tmp_path / "text", num_attention_heads=1)
    with pytest.raises(CTFlowError, match="holds no tokenizer"):
        load_text_encoder(out)
    (out / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")  # a pointer
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefgh"]))
    with pytest.raises(CTFlowError, match=f"cannot load text encoder from {out}"):
        load_text_encoder(out)
    convert_ctclip(tmp_path / "ctclip.pt", tmp_path / "text2", num_attention_heads=1)
    (tmp_path / "text2" / "vocab.txt").write_text((out / "vocab.txt").read_text())  # 13 tokens, model 100
    with pytest.raises(CTFlowError, match="knows 13 tokens, the model 100"):
        load_text_encoder(tmp_path / "text2")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(150))]
    (tmp_path / "text2" / "vocab.txt").write_text("\n".join(words))  # ids past the embedding table
    with pytest.raises(CTFlowError, match="knows 155 tokens, the model 100"):
        load_text_encoder(tmp_path / "text2")


def test_convert_ctclip_refuses_towers_it_cannot_read_as_a_bert(tmp_path, run_cli):
    import pytest

    from ctflow.errors import CTFlowError

    _fake_ctclip(tmp_path / "c.pt")  # 64 wide: one 64-wide head, read from the width
    assert run_cli("convert", "ctclip", tmp_path / "c.pt", "--out", tmp_path / "a").code == 0
    r = run_cli("convert", "ctclip", tmp_path / "c.pt", "--out", tmp_path / "b", "--num-attention-heads", 3)
    assert_clean_error(r, "3 attention heads do not divide the width 64")
    for heads in (0, -4):  # -4 was written into the config; 0 meant the default
        r = run_cli(
            "convert", "ctclip", tmp_path / "c.pt", "--out", tmp_path / "b", "--num-attention-heads", heads
        )
        assert_clean_error(r, "--num-attention-heads must be a whole number at least 1")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["text_transformer.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(
        CTFlowError, match="1 weights a BERT does not, e.g. encoder.layer.0.attention.self.rotary"
    ):
        convert_ctclip(tmp_path / "extra.pt", tmp_path / "o")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["text_transformer.encoder.layer.1.output.dense.bias"] = torch.zeros(65)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CTFlowError, match=r"encoder.layer.1.output.dense.bias is \(65,\)"):
        convert_ctclip(tmp_path / "shape.pt", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_malformed_checkpoints_and_an_empty_tokenizer_folder_are_one_line_errors(tmp_path, run_cli):
    """Each once gave a traceback (a 1-D or int embedding) or a success that copied no tokenizer."""
    state = torch.load(_fake_ctclip(tmp_path / "c.pt") and tmp_path / "c.pt", weights_only=True)
    key = "text_transformer.embeddings.word_embeddings.weight"
    for name, value, words in (
        ("onedim", torch.zeros(50), "not a 2-D embedding table"),
        ("intval", 5, "is a int, not a tensor"),
    ):
        torch.save({**state, key: value}, tmp_path / f"{name}.pt")
        assert_clean_error(
            run_cli("convert", "ctclip", tmp_path / f"{name}.pt", "--out", tmp_path / name), words
        )
    (tmp_path / "emptytok").mkdir()
    r = run_cli(
        "convert", "ctclip", tmp_path / "c.pt", "--out", tmp_path / "t", "--tokenizer", tmp_path / "emptytok"
    )
    assert_clean_error(r, "holds no tokenizer files")
    assert_clean_error(run_cli("convert", "ctclip", tmp_path, "--out", tmp_path / "d"), "is a folder")
    (tmp_path / "notes.pt").write_text("hello")
    assert_clean_error(
        run_cli("convert", "ctclip", tmp_path / "notes.pt", "--out", tmp_path / "n"), "as downloaded"
    )
    assert not any((tmp_path / n).exists() for n in ("onedim", "intval", "t", "d", "n"))
