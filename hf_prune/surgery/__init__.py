"""The one structural-surgery path. Edits in place while the walked block is materialized (``blocks``: remove
decoder blocks and renumber the config's per-layer lists; ``experts``: remove routed experts and the router's rows;
``channels``: cut a projection's rows or columns), and rebuilds (``rebuild``): built on the meta device, the kept
tensors moved in with their own dtype and device (``assign=True``: no float32 copy, no random init), buffers carried
over, every key checked, then dispatched again the way the original model was (accelerate ``device_map``, CPU
offload or hf_prune's onloading). Every edit is checked against a meta-device skeleton of the config it leaves, so a
saved folder reloads with plain ``from_pretrained``. Methods only say what to cut."""

from .blocks import remove_blocks, renumber_config, structure_mismatch, text_config, text_config_of
from .channels import keep_inputs, keep_outputs, rebuild_plain, set_linear
from .experts import remove_experts
from .rebuild import Dispatch, materialized_state_dict, parameter_shapes, rebuild_model, skeleton, updated_config

__all__ = [
    "Dispatch",
    "keep_inputs",
    "keep_outputs",
    "materialized_state_dict",
    "parameter_shapes",
    "rebuild_model",
    "rebuild_plain",
    "remove_blocks",
    "remove_experts",
    "renumber_config",
    "set_linear",
    "skeleton",
    "structure_mismatch",
    "text_config",
    "text_config_of",
    "updated_config",
]
