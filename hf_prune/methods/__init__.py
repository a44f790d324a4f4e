"""Built-in pruning methods; importing this package registers them."""

from ..registry import register_method
from .magnitude import MagnitudeConfig, MagnitudeMethod
from .wanda import WandaConfig, WandaMethod

register_method("magnitude", MagnitudeConfig, MagnitudeMethod)
register_method("wanda", WandaConfig, WandaMethod)

__all__ = ["MagnitudeConfig", "MagnitudeMethod", "WandaConfig", "WandaMethod"]
