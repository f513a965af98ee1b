"""Model zoo: importing this package registers every tlvit model with timm (see docs/models.md)."""
from . import annotator_cnn, deit, lvvit, pvt, swin  # noqa: F401  (imported for their @register_model side effects)
from .build import build_model, is_pyramid
from .lvvit import LvViT, TrainOutput, checkpoint_filter_fn, load_checkpoint_resized
from .mix_token import mix_tokens, sample_token_box, unmix_tokens

__all__ = [
    "build_model", "is_pyramid", "LvViT", "TrainOutput", "checkpoint_filter_fn", "load_checkpoint_resized",
    "mix_tokens", "sample_token_box", "unmix_tokens",
]
