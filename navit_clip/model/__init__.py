from navit_clip.model.vision import NaViT, VisionConfig, VisionOutput

__all__ = ["NaViT", "VisionConfig", "VisionOutput"]
