"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): config, BottleneckLayer (through
peftkern.ops.bottleneck_adapter), tuner, AdapterHub file reading."""
from peftkern.tuners.bottleneck.config import BottleneckConfig
from peftkern.tuners.bottleneck.layer import BottleneckLayer
from peftkern.tuners.bottleneck.tuner import BottleneckTuner, parameter_count

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckTuner", "parameter_count"]
