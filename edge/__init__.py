"""gapcast.edge: the gateway side. numpy + onnxruntime|TensorRT + paho-mqtt; never torch or pandas.

Pure logic (windows, gap detection, filling policy, message parsing) does no I/O and reads no clock; the MQTT
agent is a thin shell around it.
"""

from gapcast import GapcastError

__all__ = ["BackendError", "BundleError", "ConfigError", "EdgeError", "UpdateRejected"]


class EdgeError(GapcastError):
    """Base of the gateway's errors."""


class BundleError(EdgeError):
    """A model bundle is missing, malformed, tampered with, or signed by an untrusted key."""


class BackendError(EdgeError):
    """No inference backend can run the bundle, or a run failed."""


class ConfigError(EdgeError):
    """The gateway configuration is invalid."""


class UpdateRejected(EdgeError):
    """A fleet model update was refused (the message says why)."""
