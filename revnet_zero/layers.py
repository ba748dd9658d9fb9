"""Reversible layers and couplings (PyTorch).

``BaseCoupling`` is the README's whole-pair form, ``forward(x1, x2) -> (y1, y2)`` and
``inverse(y1, y2) -> (x1, x2)`` (``revnet_torch.PairCoupling``): subclass it and stack it in a
``ReversibleSequence``. ``AdditiveCoupling``/``AffineCoupling`` are the framework-neutral elementwise
couplings ``forward(x, fx)`` that ``ReversibleAttention``/``ReversibleFFN`` combine their block's output with;
their base is ``revnet_core.BaseCoupling``.
"""

from revnet_core.couplings import AdditiveCoupling, AffineCoupling, CouplingType
from revnet_torch.layers import PairCoupling as BaseCoupling
from revnet_torch.layers import ReversibleAttention, ReversibleFFN, ReversibleLayer, ReversibleSequence
from revnet_torch.rf_attention import RationalFourierAttention

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "RationalFourierAttention",
           "ReversibleAttention", "ReversibleFFN", "ReversibleLayer", "ReversibleSequence"]
