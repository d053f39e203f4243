"""(IA)^3: config, IA3Linear (through peftkern.ops.ia3_linear), tuner."""
from peftkern.tuners.ia3.config import IA3Config
from peftkern.tuners.ia3.layer import IA3Linear
from peftkern.tuners.ia3.tuner import IA3Tuner

__all__ = ["IA3Config", "IA3Linear", "IA3Tuner"]
