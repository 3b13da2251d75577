"""navit-clip: contrastive image-text pretraining with a packed NaViT image tower."""

__version__ = "0.1.0"
