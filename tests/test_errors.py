import pytest

from ctflow.errors import CTFlowError, one_of


@pytest.mark.parametrize(
    ("names", "spelled"),
    [
        (("full",), "'full'"),
        (("full", "factorized"), "'full' or 'factorized'"),
        (("velocity", "sample", "skip"), "'velocity', 'sample' or 'skip'"),
        ({"euler": 1, "heun": 2}, "'euler' or 'heun'"),  # a mapping's keys, in order
    ],
)
def test_one_of_spells_the_choices(names, spelled):
    assert one_of(names) == spelled


def test_messages_are_one_line():
    err = CTFlowError("first line\n  second   line")
    assert str(err) == "first line second line"
