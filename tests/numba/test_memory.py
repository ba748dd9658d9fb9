"""Live array bytes after the forward: flat in depth under ``reverse``, growing with depth under ``store``."""

import numpy as np

import revnet_core
from revnet_numba.memory import live_array_bytes


def after_forward(num_layers: int, policy: str) -> tuple[int, int]:
    """(bytes reachable from the pending backward, minus the parameters; bytes of one layer's parameters)."""
    m = revnet_core.build("numba", num_layers=num_layers, d_model=32, num_heads=2, vocab_size=37, max_seq_len=256,
                          policy=policy)
    ids = np.random.default_rng(0).integers(0, 37, (1, 200))
    pending = m.forward_backward(ids)
    layer = sum(v.nbytes for k, v in m.params.items() if k.startswith("layers.0."))
    return live_array_bytes(pending, exclude=m.params.values()), layer


def test_reverse_is_flat_in_depth():
    two, layer = after_forward(2, "reverse")
    eight, _ = after_forward(8, "reverse")
    assert two > 0
    assert abs(eight - two) < layer


def test_store_grows_with_depth():
    two, _ = after_forward(2, "store")
    eight, _ = after_forward(8, "store")
    reverse_two, _ = after_forward(2, "reverse")
    per_layer = (eight - two) / 6
    # a stored layer keeps its activations: far more than the two (1, 200, 32) float32 streams
    assert per_layer > 10 * 200 * 32 * 4
    assert two > reverse_two


def test_live_bytes_counts_views_once_and_sees_closures():
    a = np.zeros(1000)

    def pull():
        return a[::2]

    assert live_array_bytes({"x": a, "y": a[10:], "f": pull}) == a.nbytes
    assert live_array_bytes([a], exclude=[a]) == 0
