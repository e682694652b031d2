"""The one exception type users see, and the one warning type.

Every message is a single line that names the problem and, where there is one,
the fix. The CLI prints it as ``error: <message>`` and exits non-zero with no
traceback; warnings as ``warning: <message>``.
"""

import math
import numbers
import sys
import warnings

_INTERNAL = ("ctflow", "torch", "transformers", "diffusers")  # frames a warning is not attributed to


class CTFlowError(ValueError):
    """Bad input or a state we refuse to work from."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CTFlowWarning(UserWarning):
    """A one-line notice about input that works but will likely disappoint (a report cut at the
    encoder's limit, a slice count the model never trained on). The CLI prints it as
    ``warning: <message>``."""


def warn(message: str) -> None:
    """Issue a :class:`CTFlowWarning` attributed to the first caller outside ctflow (and the torch
    wrappers between, such as ``@torch.no_grad``), so that it points at the user's line and can be
    filtered by the user's module, however deep in ctflow it arose."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    warnings.warn(" ".join(str(message).split()), CTFlowWarning, stacklevel=level)


def check_whole(name: str, value, low: int, high: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number (an int or numpy integer, not a bool or a tensor)
    from ``low`` to ``high`` (no upper bound when None), naming it ``name``."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise CTFlowError(f"{name} must be a whole number {span}, got {value!r}")


def is_number(value) -> bool:
    """Whether ``value`` is a real number (an int or float, numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_number(value) -> bool:
    """Whether ``value`` is a finite number (an int or float, numpy's too, not a bool) above 0."""
    return is_number(value) and math.isfinite(value) and value > 0


def one_of(names) -> str:
    """The allowed ``names`` as a message spells them: ``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
