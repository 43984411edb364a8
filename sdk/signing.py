"""Keyed signatures over an artifact's manifest.

The manifest lists the sha256 of every file, so a signature over its exact
bytes covers the whole artifact.  The hashes alone protect against damage; a
signature protects against a sender: whoever rewrites a file must rewrite its
hash, which breaks the signature.

Two kinds of key, told apart by the key file's content:

- **Ed25519** (a PEM file; ``openssl genpkey -algorithm ed25519 -out signer.pem``
  and ``openssl pkey -in signer.pem -pubout -out device.pem``): the signer holds
  the private key, devices and CI hold only the public one.  Needs the
  ``cryptography`` package (``pip install 'edgepack[sign]'``), the Python
  Cryptographic Authority's library.
- **HMAC-SHA256** (any other file of at least 16 bytes, e.g. ``head -c 32
  /dev/urandom > team.key``): one shared secret for signing and checking, from
  Python's standard ``hmac`` module.

The signature is ``signature.json`` beside ``manifest.json``; it is not listed
in the manifest (it signs it).

>>> sign("out/model", Path("team.key").read_bytes())                # doctest: +SKIP
>>> sdk.load("out/model", verify_key=Path("team.key").read_bytes())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from .errors import ArtifactError, ConfigError

SIGNATURE = "signature.json"
MIN_HMAC_KEY = 16
_MAX_SIGNATURE_BYTES = 4096


def _key_bytes(key) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    if isinstance(key, (str, os.PathLike)):
        if not Path(key).is_file():
            raise ConfigError(f"key file {key} does not exist (or is not a file)")
        try:
            return Path(key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {key}: {exc.strerror or exc}") from None
    raise ConfigError(f"a signing key is bytes or a key file path, got {type(key).__name__}")


def _is_pem(key: bytes) -> bool:
    return key.lstrip().startswith(b"-----BEGIN")


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("Ed25519 (PEM) keys need the cryptography package: pip install 'edgepack[sign]'; "
                          "or use a raw shared key file for HMAC-SHA256") from None
    return serialization, ed25519


def _key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def _hmac_key(key: bytes) -> bytes:
    if len(key) < MIN_HMAC_KEY:
        raise ConfigError(f"an HMAC key must be at least {MIN_HMAC_KEY} bytes (got {len(key)}); "
                          "make one with: head -c 32 /dev/urandom > team.key")
    return key


def sign(path, key) -> Path:
    """Sign the artifact at ``path`` with ``key`` (bytes or key file path); returns
    the signature file.  Replaces an earlier signature."""
    from .artifact import load
    from .contract import MANIFEST

    path = Path(path)
    load(path)                                  # sign only what would load
    manifest = (path / MANIFEST).read_bytes()
    key = _key_bytes(key)
    if _is_pem(key):
        serialization, ed25519 = _crypto()
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the PEM key is not an unencrypted private key: {exc}") from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ConfigError("only Ed25519 private keys sign edgepack artifacts "
                              "(openssl genpkey -algorithm ed25519)")
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        doc = {"algorithm": "ed25519", "key_id": _key_id(public), "signature": private.sign(manifest).hex()}
    else:
        secret = _hmac_key(key)
        doc = {"algorithm": "hmac-sha256", "key_id": _key_id(hashlib.sha256(secret).digest()),
               "signature": hmac.new(secret, manifest, hashlib.sha256).hexdigest()}
    out = path / SIGNATURE
    tmp = path / f".{SIGNATURE}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def check_signature(path: Path, manifest: bytes, key) -> None:
    """Raise :class:`ArtifactError` unless ``signature.json`` in ``path`` signs the
    ``manifest`` bytes with ``key`` (the HMAC secret, or an Ed25519 public or private PEM)."""
    key = _key_bytes(key)
    sig_path = path / SIGNATURE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise ArtifactError(f"artifact {path} is not signed, and a verify key was given; "
                            f"sign it with `edgepack sign {path} --key KEY`")
    try:
        if sig_path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        doc = json.loads(sig_path.read_bytes())
        algorithm, signature = doc["algorithm"], bytes.fromhex(doc["signature"])
        if not isinstance(algorithm, str):
            raise TypeError("algorithm")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{sig_path} is damaged ({exc})") from None
    wrong = ArtifactError(f"artifact {path} is not signed by this key: its manifest was changed after "
                          "signing, or it was signed by someone else; do not use it")
    if _is_pem(key):
        if algorithm != "ed25519":
            raise wrong
        serialization, ed25519 = _crypto()
        try:
            public = serialization.load_pem_public_key(key)
        except ValueError:
            try:
                public = serialization.load_pem_private_key(key, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"the PEM verify key is neither a public nor a private key: {exc}") from None
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise ConfigError("only Ed25519 keys verify edgepack artifacts")
        from cryptography.exceptions import InvalidSignature

        try:
            public.verify(signature, manifest)
        except InvalidSignature:
            raise wrong from None
    else:
        secret = _hmac_key(key)
        if algorithm != "hmac-sha256" or not hmac.compare_digest(
                signature, hmac.new(secret, manifest, hashlib.sha256).digest()):
            raise wrong
