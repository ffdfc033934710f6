import os

import pytest
from hypothesis import given, settings, strategies as st

from common.messages import Announcement, Plan, RunnerState, decode, encode
from common.tokens import (InviteToken, TokenError, admission_proof, check_admission, decode_token, encode_token,
                           new_mesh_id, new_secret)


def make_token() -> InviteToken:
    return InviteToken(new_mesh_id(), new_secret(), "ab" * 16, (("198.51.100.1", 7842), ("127.0.0.1", 7842)))


def test_token_round_trip():
    token = make_token()
    assert decode_token(encode_token(token)) == token


@pytest.mark.parametrize("text", ["", "garbage!!", "eyJ2IjogMn0", "x" * 5000])
def test_malformed_tokens_say_what_to_do(text):
    with pytest.raises(TokenError, match="meshctl token"):
        decode_token(text)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_fuzzed_tokens_never_crash(text):
    try:
        decode_token(text)
    except TokenError:
        pass


def test_admission_proof_binds_secret_nonce_and_both_ids():
    secret, nonce = new_secret(), os.urandom(32)
    proof = admission_proof(secret, nonce, "a" * 32, "b" * 32)
    assert check_admission(secret, nonce, "a" * 32, "b" * 32, proof)
    assert not check_admission(new_secret(), nonce, "a" * 32, "b" * 32, proof)
    assert not check_admission(secret, os.urandom(32), "a" * 32, "b" * 32, proof)
    assert not check_admission(secret, nonce, "c" * 32, "b" * 32, proof)
    assert not check_admission(secret, nonce, "a" * 32, "b" * 32, None)


def test_messages_round_trip_through_the_one_decoder():
    for message in (Plan(state="solo", host="a"), RunnerState(memory_bytes=5),
                    Announcement(node_id="a", seq=1, role="worker", version="x", mesh_addrs=[("h", 1)])):
        assert decode(encode(message)) == message


def test_unknown_kinds_are_rejected():
    with pytest.raises(Exception):
        decode(b'{"kind": "nope"}')


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=70),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "mesh", "secret", "node", "addrs"]), _json))
def test_fuzzed_token_payloads_are_refused_or_valid(payload):
    """Well-formed base64 JSON with every field of the wrong type or shape: a TokenError, never a crash."""
    import base64
    import json
    text = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    try:
        token = decode_token(text)
    except TokenError:
        return
    assert token.mesh_id and token.secret and token.node_id
