"""ps3edge: PS3 / VILA-HD from PyTorch to ONNX and TensorRT, and a runtime for the look-close loop."""

__version__ = "0.1.0"
