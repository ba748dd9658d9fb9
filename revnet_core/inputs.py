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


def check_labels_shape(labels_shape: tuple, ids_shape: tuple) -> None:
    """Labels pair with the input ids position by position."""
    if tuple(labels_shape) != tuple(ids_shape):
        raise InputError(f"labels shape {tuple(labels_shape)} must match input_ids shape {tuple(ids_shape)}")


def check_loss_length(T: int) -> None:
    """Without labels, the next-token loss of T tokens needs a next token: T >= 2."""
    if T < 2:
        raise InputError("next-token loss needs at least 2 tokens (or pass compute_loss=False)")


def check_id_range(lowest: int, highest: int, vocab_size: int, what: str) -> None:
    """Token ids (their smallest and largest value) must lie in [0, vocab_size)."""
    if lowest < 0 or highest >= vocab_size:
        raise InputError(f"{what} out of range: ids must lie in [0, {vocab_size}), got [{lowest}, {highest}]")
