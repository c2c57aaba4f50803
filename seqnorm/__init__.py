"""seqnorm: normalized recurrent cells and layers (Online Normalization, layer norm, none)."""
from .cells import LSTMCell, RNNCell
from .layers import LSTM, RNN
from .norms import GroupLayerNorm, OnlineNormConfig
from .online_norm import OnlineNorm, OnlineNormState, online_norm

__all__ = ["LSTM", "RNN", "LSTMCell", "RNNCell", "OnlineNorm", "OnlineNormState", "OnlineNormConfig", "GroupLayerNorm",
           "online_norm"]
__version__ = "0.1.0"
