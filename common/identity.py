"""Node identity: the node's long-lived ECDSA P-256 key, its self-signed certificate, and the
signed-challenge exchange every data/control connection uses to prove which node is dialing.

A node id is the first 32 hex characters of sha256(SubjectPublicKeyInfo DER) of the node key.
TLS (QUIC or TCP) proves the *server* holds its key; the dialer then pins that key's node id.
Neither qh3's (aioquic's) server nor `ssl` verifies a self-signed *client* certificate, so the dialer
proves itself in-band: it signs the server's fresh nonce, the server's node id and the protocol
name (plus a digest of whatever claims it presents), so an answer can be neither replayed nor
relayed to another node. `make_challenge` / `answer_challenge` / `check_answer` are that exchange,
sans-I/O, shared by `common.quic` and the TCP lane of the tunnels.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_FILE = "node_key.pem"
CERT_FILE = "node_cert.pem"
_LOCK_FILE = ".node_identity.lock"
NODE_ID_HEX_CHARS = 32
NONCE_BYTES = 32
CERT_VALIDITY_DAYS = 100 * 365
_AUTH_DOMAIN = b"mesh-inference node-auth v1\x00"


class AuthError(Exception):
    """A peer failed to authenticate, or refused us; `.reason` says why (one line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def public_key_der_of(public_key: ec.EllipticCurvePublicKey | Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def node_id_of_public_key(public_key: bytes | Any) -> str:
    """Node id of a public key given as SubjectPublicKeyInfo DER bytes or a key object."""
    der = bytes(public_key) if isinstance(public_key, (bytes, bytearray, memoryview)) \
        else public_key_der_of(public_key)
    return hashlib.sha256(der).hexdigest()[:NODE_ID_HEX_CHARS]


def node_id_of_cert(der: bytes) -> str:
    """Node id of the key in an X.509 certificate given as DER bytes."""
    return node_id_of_public_key(x509.load_der_x509_certificate(der).public_key())


def is_node_id(value: object) -> bool:
    return (isinstance(value, str) and len(value) == NODE_ID_HEX_CHARS
            and all(c in "0123456789abcdef" for c in value))


class NodeIdentity:
    """The node key + certificate on disk, and signing with it."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate,
                 key_path: Path, cert_path: Path):
        self._private_key = private_key
        self.certificate = certificate
        self.key_path = key_path
        self.cert_path = cert_path
        self.public_key_der = public_key_der_of(private_key.public_key())
        self.node_id = node_id_of_public_key(self.public_key_der)
        self.cert_der = certificate.public_bytes(serialization.Encoding.DER)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._private_key

    @classmethod
    def load_or_create(cls, home: Path | str) -> "NodeIdentity":
        """Load the identity under `home`, creating key and certificate the first time.

        Several daemons start at once against the same home, so creation happens under a
        file lock and files appear atomically (written aside, then renamed).
        """
        home = Path(home)
        if not home.exists():
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = home / KEY_FILE, home / CERT_FILE
        with _file_lock(home / _LOCK_FILE):
            if key_path.exists():
                _tighten_mode(key_path)
                private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if not isinstance(private_key, ec.EllipticCurvePrivateKey) or \
                        not isinstance(private_key.curve, ec.SECP256R1):
                    raise ValueError(f"{key_path} is not an ECDSA P-256 key; move it away to get a new identity")
            else:
                private_key = ec.generate_private_key(ec.SECP256R1())
                pem = private_key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
                _write_atomically(key_path, pem, mode=0o600)
            node_id = node_id_of_public_key(private_key.public_key())
            certificate = None
            if cert_path.exists():
                try:
                    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
                except ValueError:
                    certificate = None
                # A certificate for another key (e.g. the key file was replaced) is rebuilt.
                if certificate is not None and node_id_of_public_key(certificate.public_key()) != node_id:
                    certificate = None
            if certificate is None:
                certificate = _self_signed_cert(private_key, node_id)
                _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(private_key, certificate, key_path, cert_path)

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data, ec.ECDSA(hashes.SHA256()))

    @staticmethod
    def verify(public_key_der: bytes, data: bytes, signature: bytes) -> bool:
        try:
            public_key = serialization.load_der_public_key(public_key_der)
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                return False
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            return False

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"


def _self_signed_cert(private_key: ec.EllipticCurvePrivateKey, node_id: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private_key, hashes.SHA256()))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed or the file may have pre-existed
    os.replace(tmp, path)


def _tighten_mode(key_path: Path) -> None:
    if key_path.stat().st_mode & 0o077:
        os.chmod(key_path, 0o600)


# --- the signed-challenge exchange (sans-I/O) ----------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or len(value) > (max_bytes * 4) // 3 + 4:
        raise AuthError(f"malformed authentication answer: bad {what}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthError(f"malformed authentication answer: bad {what}") from None


def _claims_digest(claims: dict) -> bytes:
    canonical = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).digest()


def _signed_message(nonce: bytes, server_node_id: str, context: str, claims: dict) -> bytes:
    # Domain-separated; binds the nonce (freshness), the server (no relaying), the protocol
    # (no cross-protocol reuse) and the claims (they travel with the key's signature).
    return b"".join([_AUTH_DOMAIN, nonce, server_node_id.encode("ascii"), b"\x00",
                     context.encode("utf-8"), b"\x00", _claims_digest(claims)])


def make_challenge(server: NodeIdentity) -> tuple[bytes, dict]:
    """A fresh nonce and the challenge frame the serving side sends first."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, {"type": "challenge", "nonce": _b64(nonce), "node_id": server.node_id}


def parse_challenge(frame: object) -> tuple[bytes, str]:
    """(nonce, claimed server node id) from a challenge frame; AuthError if malformed."""
    if not isinstance(frame, dict) or frame.get("type") != "challenge":
        raise AuthError("malformed authentication challenge")
    nonce = _unb64(frame.get("nonce"), "nonce", 64)
    server_id = frame.get("node_id")
    if len(nonce) < 16 or not is_node_id(server_id):
        raise AuthError("malformed authentication challenge")
    return nonce, server_id


def answer_challenge(dialer: NodeIdentity, nonce: bytes, server_node_id: str, context: str,
                     claims: dict | None = None) -> dict:
    """The dialer's answer frame. `server_node_id` must be the id the dialer verified itself
    (from the server's certificate), never one the server merely claimed."""
    claims = dict(claims or {})
    signature = dialer.sign(_signed_message(nonce, server_node_id, context, claims))
    return {"type": "auth", "node_id": dialer.node_id, "public_key": _b64(dialer.public_key_der),
            "signature": _b64(signature), "claims": claims}


def check_answer(frame: object, nonce: bytes, server_node_id: str, context: str) -> tuple[str, dict]:
    """Verify an answer frame; returns (dialer node id, claims) or raises AuthError."""
    if not isinstance(frame, dict) or frame.get("type") != "auth":
        raise AuthError("malformed authentication answer")
    node_id = frame.get("node_id")
    claims = frame.get("claims", {})
    if not is_node_id(node_id) or not isinstance(claims, dict):
        raise AuthError("malformed authentication answer")
    public_key = _unb64(frame.get("public_key"), "public key", 1024)
    signature = _unb64(frame.get("signature"), "signature", 256)
    if node_id_of_public_key(public_key) != node_id:
        raise AuthError("node id does not match the public key presented")
    try:
        message = _signed_message(nonce, server_node_id, context, claims)
    except (TypeError, ValueError):
        raise AuthError("malformed authentication answer: claims are not plain JSON") from None
    if not NodeIdentity.verify(public_key, message, signature):
        raise AuthError("bad signature on the authentication answer")
    return node_id, claims
