"""Parameter validation shared by the format and configuration objects."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` if it is an integer in ``[lo, hi]``; else raise ``ValueError``.

    The message names the parameter, the value and the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; accepted range is [{lo}, {hi}]")
    return value
