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
