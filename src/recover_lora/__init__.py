"""recover-lora: repair damaged LLM weights by distilling the reference into LoRA adapters.

Stages, one module each: ``load`` -> ``degrade`` -> ``synth`` -> ``distill`` -> ``evaluate`` ->
``report`` -> ``export``; ``recover.recover`` runs the whole job. Each stage has one typed config.
(The functions ``degrade.degrade`` and ``recover.recover`` are not re-exported here: their names
are taken by their modules.)
"""

from .degrade import DegradeConfig
from .distill import AdapterConfig, DistillConfig, attach_adapters, measure, train
from .load import LoadConfig, check_compatible, load_model, load_pair, load_tokenizer
from .recover import RecoverConfig
from .synth import SynthConfig, load_synthetic, synthesize
from .utils import RecoverLoraError

__version__ = "0.1.0"
__all__ = ["LoadConfig", "load_model", "load_tokenizer", "load_pair", "check_compatible", "DegradeConfig",
           "SynthConfig", "synthesize", "load_synthetic", "AdapterConfig", "DistillConfig",
           "attach_adapters", "train", "measure", "RecoverConfig", "RecoverLoraError"]
