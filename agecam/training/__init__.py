"""UTKFace data work, ResNet50 training and evaluation (torch lives here)."""
