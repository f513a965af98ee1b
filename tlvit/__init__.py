"""tlvit: reproduce and audit Token Labeling (LV-ViT) and Token-Label Alignment (TL-Align).

`import tlvit` registers every tlvit model with timm, so `timm.create_model("lvvit_s")` works after it.
"""
from tlvit import models as _models  # noqa: F401  (imported for its @register_model side effects)

__version__ = "0.1.0"
