"""Lightning callbacks that run NeMo AutoModel's model utilities at the right moment of the lifecycle."""

from lightning_automodel.callbacks.cast_mixed_dtype import CastMixedDtypeToBF16
from lightning_automodel.callbacks.freeze_dead_parameters import FreezeDeadParameters
from lightning_automodel.callbacks._lifecycle import prepare_before_sharding
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from lightning_automodel.callbacks.lora import LoRA
from lightning_automodel.callbacks.parameter_freezing import ParameterFreezing
from lightning_automodel.callbacks.parameter_summary import ParameterSummary
from lightning_automodel.callbacks.thd_squeeze import THDSqueeze
from lightning_automodel.callbacks.tied_lm_head import TiedLMHead

__all__ = [
    "CastMixedDtypeToBF16",
    "FreezeDeadParameters",
    "HuggingFaceCheckpoint",
    "LoRA",
    "ParameterFreezing",
    "ParameterSummary",
    "THDSqueeze",
    "TiedLMHead",
    "prepare_before_sharding",
]
