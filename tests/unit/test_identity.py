"""Node identity files, node ids, signatures and the signed-challenge exchange."""
from __future__ import annotations

import datetime
import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common.identity import (
    AuthError,
    NodeIdentity,
    answer_challenge,
    check_answer,
    make_challenge,
    node_id_of_cert,
    node_id_of_public_key,
    parse_challenge,
)

REPO = Path(__file__).resolve().parents[2]


def test_creates_key_and_cert_with_private_modes(tmp_path: Path) -> None:
    home = tmp_path / "node"
    identity = NodeIdentity.load_or_create(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert identity.key_path == home / "node_key.pem" and identity.cert_path == home / "node_cert.pem"
    assert identity.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_reloads_the_same_identity(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path)
    cert_bytes = first.cert_path.read_bytes()
    second = NodeIdentity.load_or_create(tmp_path)
    assert second.node_id == first.node_id
    assert second.cert_path.read_bytes() == cert_bytes  # created once, then reused


def test_node_id_is_sha256_of_spki(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    expected = hashlib.sha256(identity.public_key_der).hexdigest()[:32]
    assert identity.node_id == expected
    assert node_id_of_public_key(identity.public_key_der) == expected
    assert node_id_of_public_key(identity.private_key.public_key()) == expected
    assert node_id_of_cert(identity.cert_der) == expected


def test_certificate_names_the_node_and_lasts(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    cert = x509.load_pem_x509_certificate(identity.cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.node_id
    assert cert.issuer == cert.subject
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=3650)
    public = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public == identity.public_key_der


def test_cert_for_another_key_is_rebuilt(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path / "a")
    other = NodeIdentity.load_or_create(tmp_path / "b")
    identity.cert_path.write_bytes(other.cert_path.read_bytes())
    again = NodeIdentity.load_or_create(tmp_path / "a")
    assert again.node_id == identity.node_id
    assert node_id_of_cert(again.cert_der) == identity.node_id


def test_loose_key_permissions_are_tightened(tmp_path: Path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    identity.key_path.chmod(0o644)
    NodeIdentity.load_or_create(tmp_path)
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600


def test_concurrent_first_start_agrees_on_one_identity(tmp_path: Path) -> None:
    """Daemons start together against one home; all must end up with the same key."""
    code = ("import sys; from common.identity import NodeIdentity; "
            "print(NodeIdentity.load_or_create(sys.argv[1]).node_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1
    assert ids == {NodeIdentity.load_or_create(tmp_path / "home").node_id}


def test_sign_and_verify(tmp_path: Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path / "a")
    b = NodeIdentity.load_or_create(tmp_path / "b")
    signature = a.sign(b"message")
    assert NodeIdentity.verify(a.public_key_der, b"message", signature)
    assert not NodeIdentity.verify(a.public_key_der, b"messagf", signature)
    assert not NodeIdentity.verify(b.public_key_der, b"message", signature)
    assert not NodeIdentity.verify(b"not a key", b"message", signature)
    assert not NodeIdentity.verify(a.public_key_der, b"message", b"not a signature")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[NodeIdentity, NodeIdentity]:
    return NodeIdentity.load_or_create(tmp_path / "server"), NodeIdentity.load_or_create(tmp_path / "dialer")


def test_challenge_exchange(pair) -> None:
    server, dialer = pair
    nonce, challenge = make_challenge(server)
    got_nonce, server_id = parse_challenge(challenge)
    assert (got_nonce, server_id) == (nonce, server.node_id)
    answer = answer_challenge(dialer, nonce, server_id, "alpn/1", {"mesh": "m1", "proof": "p"})
    node_id, claims = check_answer(answer, nonce, server.node_id, "alpn/1")
    assert node_id == dialer.node_id and claims == {"mesh": "m1", "proof": "p"}


@pytest.mark.parametrize("tamper", ["nonce", "server", "context", "claims", "node_id", "key", "signature"])
def test_challenge_answer_cannot_be_reused_or_altered(pair, tamper: str) -> None:
    server, dialer = pair
    nonce, _ = make_challenge(server)
    answer = answer_challenge(dialer, nonce, server.node_id, "alpn/1", {"mesh": "m1"})
    check_nonce, check_server, check_context = nonce, server.node_id, "alpn/1"
    if tamper == "nonce":
        check_nonce = make_challenge(server)[0]          # replay against a fresh challenge
    elif tamper == "server":
        check_server = dialer.node_id                     # relayed to another node
    elif tamper == "context":
        check_context = "other/1"
    elif tamper == "claims":
        answer["claims"] = {"mesh": "m2"}
    elif tamper == "node_id":
        answer["node_id"] = server.node_id
    elif tamper == "key":
        answer["public_key"] = answer_challenge(server, nonce, server.node_id, "alpn/1")["public_key"]
    elif tamper == "signature":
        answer["signature"] = "AAAA"
    with pytest.raises(AuthError):
        check_answer(answer, check_nonce, check_server, check_context)


@pytest.mark.parametrize("frame", [None, [], {"type": "auth"}, {"type": "other"},
                                   {"type": "auth", "node_id": "x" * 32, "public_key": "!!", "signature": "",
                                    "claims": {}},
                                   {"type": "auth", "node_id": "0" * 32, "public_key": "A" * 100000,
                                    "signature": "", "claims": {}}])
def test_malformed_answers_are_auth_errors(pair, frame) -> None:
    server, _ = pair
    with pytest.raises(AuthError):
        check_answer(frame, b"n" * 32, server.node_id, "alpn/1")


@pytest.mark.parametrize("frame", [None, {"type": "challenge"}, {"type": "challenge", "nonce": "AAAA",
                                                                  "node_id": "0" * 32},
                                   {"type": "challenge", "nonce": "A" * 44, "node_id": "zz"}])
def test_malformed_challenges_are_auth_errors(frame) -> None:
    with pytest.raises(AuthError):
        parse_challenge(frame)
