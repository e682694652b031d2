"""The one exception type users see.

Every message is a single line that names the problem and, where there is one,
the fix. The CLI prints it as ``error: <message>`` and exits non-zero with no
traceback.
"""


class CTFlowError(ValueError):
    """Bad input or a state we refuse to work from."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
