"""The one path that rebuilds a model whose structure a step changed: built on the meta device, the kept tensors
moved in with their own dtype and device (``assign=True``: no float32 copy, no random init), buffers carried over,
every key checked, then dispatched again the way the original model was (accelerate ``device_map``, CPU offload or
hf_prune's onloading). Methods only say what the new model is (a config, or a builder)."""

from .rebuild import Dispatch, materialized_state_dict, parameter_shapes, rebuild_model, skeleton, updated_config

__all__ = ["Dispatch", "materialized_state_dict", "parameter_shapes", "rebuild_model", "skeleton", "updated_config"]
