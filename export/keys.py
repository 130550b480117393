"""Ed25519 signing keys for bundles (RFC 8032, via the ``cryptography`` library).

The private key signs ``card.json`` at export time (``gapcast export --sign-key``); gateways hold only the public
key and verify with :func:`gapcast.edge.bundle.verify_bundle`. Keys are PEM files: PKCS#8 for the private key
(unencrypted, file mode 0600), SubjectPublicKeyInfo for the public key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gapcast.export import ExportError

__all__ = ["PRIVATE_KEY_NAME", "PUBLIC_KEY_NAME", "KeyPair", "generate_keypair", "load_private_key", "public_key_hex"]

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "gapcast-signing.key"
PUBLIC_KEY_NAME = "gapcast-signing.pub"


@dataclass(frozen=True)
class KeyPair:
    """Paths of a generated key pair.

    Attributes:
        private: PKCS#8 PEM private key (keep it on the release machine only).
        public: SubjectPublicKeyInfo PEM public key (install it on gateways as a trusted key).
        public_hex: the raw 32-byte public key as 64 hex characters (also accepted as a trusted key).
    """

    private: Path
    public: Path
    public_hex: str


def generate_keypair(out_dir: str | Path, *, overwrite: bool = False) -> KeyPair:
    """Generate an Ed25519 key pair and write it as two PEM files in ``out_dir``.

    Args:
        out_dir: folder for ``gapcast-signing.key`` and ``gapcast-signing.pub`` (created if absent).
        overwrite: replace existing key files; False refuses, so a release key is never lost by accident.

    Returns:
        The :class:`KeyPair`.

    Raises:
        ExportError: a key file exists and ``overwrite`` is False, or the folder cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        msg = f"key files already exist in {out}; refusing to overwrite them (pass --force to replace)"
        raise ExportError(msg)
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key()
    pub_pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Create the private key file with 0600 from the start, never world-readable for an instant.
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv_pem)
        os.chmod(priv_path, 0o600)
        pub_path.write_bytes(pub_pem)
    except OSError as exc:
        msg = f"cannot write the key pair to {out}: {exc}"
        raise ExportError(msg) from exc
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    log.info("wrote Ed25519 key pair to %s (public key %s)", out, raw.hex())
    return KeyPair(private=priv_path, public=pub_path, public_hex=raw.hex())


def load_private_key(path: str | Path):
    """Load an Ed25519 private key from a PKCS#8 PEM file.

    Returns:
        ``cryptography`` ``Ed25519PrivateKey``.

    Raises:
        ExportError: unreadable, encrypted, or not an Ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        msg = f"cannot load the Ed25519 signing key from {path}: {exc}"
        raise ExportError(msg) from exc
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{path} is not an Ed25519 private key"
        raise ExportError(msg)
    return key


def public_key_hex(private_key) -> str:
    """The raw public key of a private key as 64 hex characters."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()
