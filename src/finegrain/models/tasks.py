"""The models' ``task`` argument: one name per task, the names of the datasets and of the
checkpoint meta (``"classification"``, ``"reid"``, ``"dml"``).

``"fgvc"`` is the older name of ``"classification"``: checkpoints written before 2026-11-30
store ``task: fgvc`` in their ``model_config``, so it is still accepted and normalised here
(:func:`task_name`), in the model constructors; the model then behaves exactly as with
``"classification"`` (same parameters, same losses).
"""

from __future__ import annotations

from typing import Sequence

from ..errors import InputError

__all__ = ["TASK_ALIASES", "task_name"]

#: Older task names still accepted -> the name used today.
TASK_ALIASES = {"fgvc": "classification"}


def task_name(task: str, accepted: Sequence[str], model: str) -> str:
    """``task`` with its alias resolved (``"fgvc"`` -> ``"classification"``).

    Raises:
        InputError: ``task`` is not one of ``accepted`` (nor an alias of one); the message
            names the accepted values (a ``ValueError``).
    """
    accepted = [a for a in accepted if a not in TASK_ALIASES]  # a Literal lists the aliases
    name = TASK_ALIASES.get(task, task)
    if name not in accepted:
        aliases = [f"{old!r} for {new!r}" for old, new in TASK_ALIASES.items() if new in accepted]
        names = [repr(a) for a in accepted]
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise InputError(f"{model} task must be {listed}"
                         + (f" (older name: {', '.join(aliases)})" if aliases else "")
                         + f", got {task!r}")
    return name
