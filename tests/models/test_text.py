import pytest
import torch

from ctflow.models.text import ReportEncoder, format_report, meta_problem, parse_meta, strip_meta, with_meta


@pytest.fixture(scope="module")
def encoder():
    return ReportEncoder.from_pretrained()


def test_format_report_puts_meta_line_first_and_collapses_whitespace():
    text = format_report("Lungs  clear.\n", "Normal.", num_slices=96, spacing=2.5)
    assert text == "Volume: 96 slices, 2.5 mm spacing. Findings: Lungs clear. Impressions: Normal."
    assert parse_meta(text) == (96, 2.5)


def test_format_report_without_meta_has_no_meta_line():
    assert parse_meta(format_report("x", "y")) == (None, None)


def test_with_meta_adds_one_line_and_the_requested_count_wins():
    text = with_meta("Findings: clear.", 80, 1.5)
    assert text == "Volume: 80 slices, 1.5 mm spacing. Findings: clear."
    assert with_meta(text, 80, 1.5) == text  # added once
    # a report that already asks for 80 slices, generated at 40: the model is told 40, once
    assert with_meta(text, 40, 1.5) == "Volume: 40 slices, 1.5 mm spacing. Findings: clear."
    assert with_meta(text, None) == text


def test_a_malformed_meta_spacing_is_not_a_meta_line():
    # "2.5." once matched the spacing and crashed float(); such a line is now plain report text
    assert parse_meta("Volume: 80 slices, 2.5. mm spacing. Findings: x") == (None, None)
    assert parse_meta("Volume: 80 slices, 2.5 mm spacing. Findings: x") == (80, 2.5)
    assert parse_meta("Volume: 80 slices. Findings: x") == (80, None)
    assert meta_problem("Volume: 80 slices, 2.5. mm spacing. Findings: x").endswith(
        "is not in the form 'Volume: N slices, d mm spacing.'"
    )


@pytest.mark.parametrize(
    ("report", "meta"),
    [
        # a second space, a line break or a byte-order mark once hid the line from the spacing while
        # the text the model read had it: told 2.5 mm, written at 4
        ("Volume: 48 slices, 2.5 mm  spacing. Findings: x", (48, 2.5)),
        ("\ufeffVolume: 48 slices, 2.5 mm spacing. Findings: x", (48, 2.5)),
        ("Volume: 48 slices, 2.5 mm spacing\nFindings: x", (48, 2.5)),  # its own line, no full stop
        ("Volume: 48 slices, 2,5 mm spacing. Findings: x", (48, 2.5)),  # a decimal comma
        ("volume: 80 slices", (80, None)),
        ("Findings: Lung volume: 3.2 L.", (None, None)),  # not a meta line
        ("Findings: The volume: large slices of tissue.", (None, None)),  # prose, not one
    ],
)
def test_meta_lines_are_read_as_people_write_them(report, meta):
    assert parse_meta(report) == meta and meta_problem(report) is None
    if meta[0] is not None:
        assert strip_meta(report) in ("Findings: x", "")


@pytest.mark.parametrize(
    "report",
    [
        # the spacing was dropped without a word and the volume took the model's own
        "Volume: 96 slices 2.5 mm spacing. Findings: x",
        "Volume: 96 slices at 2.5 mm spacing. Findings: x",
    ],
)
def test_meta_lines_that_would_lose_a_value_are_refused(report):
    assert "is not in the form 'Volume: N slices, d mm spacing.'" in meta_problem(report)


def test_a_meta_line_followed_by_a_size_in_mm_is_fine_and_invisible_characters_are_dropped():
    assert meta_problem("Volume: 96 slices. 5 mm nodule in the right upper lobe.") is None
    assert meta_problem("Volume: 96 slices, 2.5 mm spacing\n3 mm nodule in the right upper lobe.") is None
    assert meta_problem("Volume: 96 slices\n5 mm nodule in the right upper lobe.") is None
    assert meta_problem("Volume: 96 slices\n2 mm, right upper lobe nodule.") is None
    # "slice" is read, not taken for words while the volume took the default count
    assert parse_meta("Volume: 1 slice. Findings: x") == (1, None)
    assert parse_meta("Volume: 40 slice, 2.5 mm spacing. Findings: x") == (40, 2.5)
    assert parse_meta("\u200bVolume: 40 slices. Findings: x") == (40, None)  # was "put it first"
    assert meta_problem("\u200bVolume: 40 slices. Findings: x") is None


def test_clean_report_keeps_the_sentences_of_a_report_typed_line_by_line():
    """A bulleted report was joined into one sentence, and its first "No" negated every finding."""
    from ctflow.models.text import clean_report

    assert clean_report("Findings:\n- No pleural effusion\n- Cardiomegaly") == (
        "Findings: - No pleural effusion. - Cardiomegaly"
    )
    assert (
        clean_report("No effusion\r\nCardiomegaly\n1. Emphysema") == "No effusion. Cardiomegaly. 1. Emphysema"
    )
    # a hard-wrapped paragraph (lines near the longest, 40 characters or more) joins its lines
    wrapped = (
        "There is a small left pleural effusion and a 5 mm nodule in the\nright upper lobe. No consolidation."
    )
    assert clean_report(wrapped) == " ".join(wrapped.split())
    # a short line is an item of its own, whatever the case of the next ("a) ...", all caps, a number)
    assert clean_report("No pleural effusion\n3 mm nodule") == "No pleural effusion. 3 mm nodule"
    assert clean_report("NO EFFUSION\nCARDIOMEGALY") == "NO EFFUSION. CARDIOMEGALY"
    assert (
        clean_report("Findings:\nNormal.\n\nImpressions:\nClear.") == "Findings: Normal. Impressions: Clear."
    )
    # a line that ends in "or", "the" ... goes on in the next, whatever its first letter
    assert clean_report("No pleural effusion or\nConsolidation.") == "No pleural effusion or Consolidation."
    assert clean_report("A nodule in the\nRUL.") == "A nodule in the RUL."


@pytest.mark.parametrize(
    ("report", "problem"),
    [
        ("Volume: 80 slices; spacing 2.5 mm. Findings: x", "is not in the form"),
        ("Volume: 80.5 slices. Findings: x", "is not in the form"),
        ("Volume: 1e3 slices. Findings: x", "is not in the form"),
        ("Volume: forty slices. Findings: x", "is not in the form"),
        ("Findings: x. Volume: 48 slices, 2.5 mm spacing.", "after its start; put it first or remove it"),
        ("Volume: 48 slices. Volume: 100 slices, 5 mm spacing. Findings: x", "2 meta lines; keep one, first"),
    ],
)
def test_a_meta_line_that_would_be_read_as_plain_words_is_named(report, problem):
    assert problem in meta_problem(report)


def test_default_encoder_loads_offline_and_returns_tokens_mask_pooled(encoder):
    emb = encoder(
        ["Volume: 64 slices. Findings: normal.", "Findings: a 12 mm nodule in the right upper lobe."]
    )
    b, length, d = emb.tokens.shape
    assert (b, d) == (2, 384) and emb.mask.shape == (2, length) and emb.pooled.shape == (2, 384)
    assert emb.mask[0].sum() < emb.mask[1].sum()  # the shorter report is padded
    assert not any(p.requires_grad for p in encoder.parameters())


def test_pooled_embedding_ignores_padding(encoder):
    alone = encoder(["Heart size is normal."]).pooled
    padded = encoder(["Heart size is normal.", "A much longer report " * 10]).pooled[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_different_reports_give_different_embeddings(encoder):
    emb = encoder(["Left pleural effusion.", "Right pleural effusion.", "Left pleural effusion."]).pooled
    assert not torch.allclose(emb[0], emb[1])
    torch.testing.assert_close(emb[0], emb[2])


def test_long_report_is_truncated_with_a_warning_saying_by_how_much(encoder):
    with pytest.warns(UserWarning, match=r"truncated by \d+ tokens") as record:
        emb = encoder(["word " * 400])
    assert [w.filename for w in record] == [__file__]  # the caller's line, not torch's Module.__call__
    assert emb.tokens.shape[1] == encoder.max_length
    # "word " * 400 is 400 tokens plus [CLS] and [SEP]
    assert encoder.truncated_tokens(["word " * 400, "Normal."]) == [402 - encoder.max_length, 0]


def test_encode_each_gives_what_encoding_each_report_alone_gives_in_the_given_order(encoder):
    reports = [
        "Findings: a 12 mm nodule in the right upper lobe. Impressions: nodule.",
        "Normal.",
        "Volume: 80 slices. Findings: left pleural effusion. Heart size is enlarged. " * 3,
        "Findings: clear lungs.",
        "Normal.",
    ]
    out = encoder.encode_each(reports, batch_size=2)  # batches group by length, not by position
    assert len(out) == len(reports)
    for report, (tokens, pooled) in zip(reports, out, strict=True):
        alone = encoder([report])
        assert tokens.shape == alone.tokens[0].shape  # no padding left on
        torch.testing.assert_close(tokens, alone.tokens[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled, alone.pooled[0], atol=1e-4, rtol=1e-4)
    assert encoder.encode_each([]) == []
