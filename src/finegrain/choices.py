"""Options with a closed set of values.

Each such option is typed ``typing.Literal[...]`` in its signature: that one type lists the
accepted values. ``finegrain train`` (jsonargparse) refuses a misspelt value at parse time
from it; :func:`check_choice` refuses it from Python (``FinegrainModule(model,
scheduler="cosin")``) with the same list, and the nearest accepted value when there is one.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Iterable

from .errors import InputError

__all__ = ["check_choice", "choice_values", "nearest", "listed"]


def choice_values(kind: Any) -> tuple:
    """The accepted values of a ``Literal`` type (``Optional[Literal]`` adds ``None``)."""
    if typing.get_origin(kind) is typing.Literal:
        return tuple(typing.get_args(kind))
    out: list = []
    for arg in typing.get_args(kind):  # Union / Optional
        out.extend([None] if arg is type(None) else choice_values(arg))
    return tuple(out)


def nearest(value: Any, accepted: Iterable[Any]) -> str | None:
    """The accepted value closest to a misspelt ``value`` (the one it begins, else
    difflib's closest), or None."""
    names = [a for a in accepted if isinstance(a, str)]
    starts = [a for a in names if value and a.startswith(str(value))]
    if len(starts) == 1:  # a shortened name ("window" for "window_attention")
        return starts[0]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return close[0] if close else None


def listed(accepted: Iterable[Any]) -> str:
    """``'a', 'b' or 'c'``."""
    names = [repr(a) for a in accepted]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def refusal(option: str, value: Any, accepted: Iterable[Any]) -> str:
    """The one-paragraph message for a value outside ``accepted``."""
    accepted = list(accepted)
    near = nearest(value, accepted)
    return (f"{option} {value!r} is not an accepted value: choose {listed(accepted)}"
            + (f" (did you mean {near!r}?)" if near else ""))


def check_choice(option: str, value: Any, kind: Any) -> Any:
    """``value`` when it is one of the ``Literal`` type ``kind``'s values.

    Raises:
        InputError: naming ``option``, the accepted values and the nearest one.
    """
    accepted = choice_values(kind)
    if value not in accepted:
        raise InputError(refusal(option, value, accepted))
    return value
