"""tlvit: reproduce and audit Token Labeling (LV-ViT) and Token-Label Alignment (TL-Align)."""
__version__ = "0.1.0"
