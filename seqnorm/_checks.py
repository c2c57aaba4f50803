"""Argument checks shared by the modules: clear errors that name the argument."""
import torch


def check_alpha(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_v_decay_min(value):
    """The v-decay floor (docs/design.md §2): a float in [0, 1), or None for no floor."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"v_decay_min must be a number in [0, 1) or None (no floor), got {value!r}")
    return float(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}")
    return value


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_dtype_matches(name: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """As torch.nn's RNNs: the input's dtype must be the parameters' (autocast aside)."""
    if tensor.dtype != weight.dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise TypeError(f"{name} dtype ({tensor.dtype}) does not match the parameters' dtype ({weight.dtype}); "
                        f"convert the {name} (.to({weight.dtype})) or the module (.to({tensor.dtype}))")


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the module's parameters and state are on {device}")
