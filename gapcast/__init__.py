"""gapcast: real-time gap filling and forecasting for sensor-station networks, at the edge.

The distribution maps its top-level folders into this namespace: ``gapcast.train`` (cloud training, torch),
``gapcast.export`` (ONNX bundle, signing), ``gapcast.edge`` (the gateway agent: numpy, onnxruntime|TensorRT,
paho-mqtt; no torch, no pandas), ``gapcast.deploy`` (fleet rollout and deployment files) and ``gapcast.bench``.
"""

__version__ = "0.1.0"
__all__ = ["GapcastError", "__version__"]


class GapcastError(Exception):
    """Root of every error gapcast raises on purpose; each part derives its own from it."""
