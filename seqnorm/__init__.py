"""seqnorm: normalized recurrent cells and layers (Online Normalization, layer norm, none)."""
import torch

from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN
from .norms import GroupLayerNorm, OnlineNormConfig
from .online_norm import OnlineNorm, OnlineNormState, online_norm
from .warmup import detach_state, gate_norms, largest_gate_update, truncated_forward, truncation_schedule

# The classes a whole saved seqnorm module pickles; registered so that torch.load(..., weights_only=True)
# reads such a file without the caller listing them.
SAFE_GLOBALS = [LSTM, RNN, GRU, LSTMCell, RNNCell, GRUCell, OnlineNorm, GroupLayerNorm, OnlineNormConfig]
torch.serialization.add_safe_globals(SAFE_GLOBALS)

__all__ = ["LSTM", "RNN", "GRU", "LSTMCell", "RNNCell", "GRUCell", "OnlineNorm", "OnlineNormState", "OnlineNormConfig", "GroupLayerNorm",
           "online_norm", "SAFE_GLOBALS", "truncated_forward", "truncation_schedule", "detach_state",
           "gate_norms", "largest_gate_update"]
__version__ = "0.1.0"
