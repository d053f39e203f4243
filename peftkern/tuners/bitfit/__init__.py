"""BitFit: only biases train; config, BitFitLayer, tuner."""
from peftkern.tuners.bitfit.config import BitFitConfig
from peftkern.tuners.bitfit.layer import BitFitLayer
from peftkern.tuners.bitfit.tuner import BitFitTuner

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitTuner"]
