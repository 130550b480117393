"""gapcast.export: ONNX export, INT8 quantization, the bundle and its model card, Ed25519 signing."""

from gapcast import GapcastError

__all__ = ["ExportError"]


class ExportError(GapcastError):
    """The export cannot produce a bundle that meets its checks (the message says which)."""
