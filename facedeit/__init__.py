"""facedeit: train DeiT-style transformers and ResNet baselines on MTCNN face crops, and report."""

__version__ = "0.1.0"
