"""The one exception type users see.

Every message is a single line that names the problem and, where there is one,
the fix. The CLI prints it as ``error: <message>`` and exits non-zero with no
traceback.
"""


class CTFlowError(ValueError):
    """Bad input or a state we refuse to work from."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CTFlowWarning(UserWarning):
    """A one-line notice about input that works but will likely disappoint (a report cut at the
    encoder's limit, a slice count the model never trained on). The CLI prints it as
    ``warning: <message>``."""


def one_of(names) -> str:
    """The allowed ``names`` as a message spells them: ``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
