"""Input checks every backend shares: the rules and the messages live here once, the backends only say how
to read a length or the smallest and largest id from their own arrays."""

from __future__ import annotations

from .errors import InputError


def check_length(T: int, max_seq_len: int, what: str) -> None:
    """A sequence of T tokens must be non-empty and fit the model's ``max_seq_len``."""
    if T == 0:
        raise InputError(f"{what} is empty: need at least one token")
    if T > max_seq_len:
        raise InputError(f"sequence length {T} exceeds max_seq_len={max_seq_len}")


def check_id_range(lowest: int, highest: int, vocab_size: int, what: str) -> None:
    """Token ids (their smallest and largest value) must lie in [0, vocab_size)."""
    if lowest < 0 or highest >= vocab_size:
        raise InputError(f"{what} out of range: ids must lie in [0, {vocab_size}), got [{lowest}, {highest}]")
