from __future__ import annotations

import dataclasses
import hashlib
import hmac

import pytest

from he_service.auth import (
    ANONYMOUS,
    MAX_AUTHORIZATION_LENGTH,
    UNAUTHORIZED_MESSAGE,
    Principal,
    TokenTable,
    hash_token,
    is_well_formed_token,
    new_token,
)
from he_service.errors import Unauthorized

TOKENS = {"alice": new_token(), "bob": new_token(), "carol": new_token()}
SPEC = ",".join(f"{name}:{hash_token(token)}" for name, token in TOKENS.items())


@pytest.fixture
def table() -> TokenTable:
    return TokenTable.parse(SPEC)


def test_hash_token_is_sha256_hex_of_utf8() -> None:
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    assert hash_token("abc") == abc
    assert hash_token("é") == hashlib.sha256("é".encode()).hexdigest()


def test_new_token_is_random_and_urlsafe() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) == 43 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)


def test_is_well_formed_token() -> None:
    assert is_well_formed_token(new_token())
    assert is_well_formed_token("abc-._~+/123==")
    assert is_well_formed_token("a" * (MAX_AUTHORIZATION_LENGTH - 7))
    for bad in ("", "two words", "tökén", "=abc", "a=b", "a" * (MAX_AUTHORIZATION_LENGTH - 6)):
        assert not is_well_formed_token(bad), bad


def test_principal_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ANONYMOUS.name = "root"  # type: ignore[misc]


@pytest.mark.parametrize("spec", ["", "   ", "\n"])
def test_blank_spec_disables_auth(spec: str) -> None:
    table = TokenTable.parse(spec)
    assert not table.enabled and len(table) == 0
    assert table.authenticate(None) is ANONYMOUS
    assert table.authenticate("Bearer whatever") is ANONYMOUS


def test_parse_tolerates_whitespace_uppercase_and_trailing_comma() -> None:
    token = new_token()
    table = TokenTable.parse(f"  alice :  {hash_token(token).upper()} ,\n bob:{'1' * 64} , ")
    assert table.enabled and table.names == ("alice", "bob")
    assert table.authenticate(f"Bearer {token}") == Principal("alice")


def test_repr_shows_names_not_hashes(table: TokenTable) -> None:
    assert hash_token(TOKENS["alice"]) not in repr(table)
    assert "alice" in repr(table)


GOOD = hash_token("a-good-token")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("a-raw-token-pasted-by-mistake", "entry 1 is not 'name:sha256hex'"),
        (f"alice:{GOOD},,bob:{hash_token('x')}", "entry 2 is empty"),
        (f":{GOOD}", "the name must be"),
        (f"al ice:{GOOD}", "the name must be"),
        (f"-alice:{GOOD}", "the name must be"),
        (f"{'a' * 65}:{GOOD}", "the name must be"),
        (f"anonymous:{GOOD}", "reserved"),
        (f"alice:{GOOD}, alice:{hash_token('other')}", "entry 2: the name 'alice' appears twice"),
        (f"alice:{GOOD}, bob:{GOOD}", "entry 2 ('bob'): the same hash as an earlier entry"),
        (f"alice:{GOOD[:-1]}", "got 63 characters"),
        (f"alice:{GOOD}0", "got 65 characters"),
        (f"alice:{GOOD[:-1]}g", "got 64 characters that are not all hex"),
        ("alice:", "got 0 characters"),
        (f"alice:{hash_token('')}", "the hash is that of an empty token"),
    ],
)
def test_parse_errors_are_clear_and_never_echo_secrets(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="api_tokens entry") as excinfo:
        TokenTable.parse(spec)
    message = str(excinfo.value)
    assert fragment in message
    # Neither a hash (nor anything hash-like) nor a pasted raw token comes back.
    for secret in (GOOD, GOOD[:-1], hash_token(""), "a-raw-token-pasted-by-mistake"):
        assert secret not in message


def test_authenticate_accepts_every_configured_token(table: TokenTable) -> None:
    for name, token in TOKENS.items():
        assert table.authenticate(f"Bearer {token}") == Principal(name)
    # The scheme is case-insensitive and surrounding whitespace is tolerated.
    assert table.authenticate(f"  bearer   {TOKENS['bob']}  ") == Principal("bob")
    assert table.authenticate(f"BEARER {TOKENS['carol']}") == Principal("carol")


BAD_HEADERS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Basic YWxpY2U6c2VjcmV0",
    f"Token {TOKENS['alice']}",
    f"Bearer{TOKENS['alice']}",
    f"Bearer {TOKENS['alice']} extra",
    f"Bearer {TOKENS['alice']}x",
    f"Bearer {TOKENS['alice'][:-1]}",
    f"Bearer {hash_token(TOKENS['alice'])}",  # the hash is not the token
    "Bearer " + new_token(),
    "Bearer tökén",
    "Bearer " + "a" * (MAX_AUTHORIZATION_LENGTH - 6),
    f"Bearer {TOKENS['alice']}" + " " * MAX_AUTHORIZATION_LENGTH,  # valid token, header too long
]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_every_failure_gives_the_same_401(table: TokenTable, header: str | None) -> None:
    with pytest.raises(Unauthorized) as excinfo:
        table.authenticate(header)
    error = excinfo.value
    assert error.status == 401 and error.code == "unauthorized"
    assert error.message == UNAUTHORIZED_MESSAGE
    assert error.to_json() == {"error": {"code": "unauthorized", "message": UNAUTHORIZED_MESSAGE}}


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKENS['alice']}",  # first entry matches
        f"Bearer {TOKENS['carol']}",  # last entry matches
        *BAD_HEADERS,
    ],
)
def test_every_entry_is_compared_with_compare_digest(
    table: TokenTable, header: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    try:
        table.authenticate(header)
    except Unauthorized:
        pass
    # Once per configured token whatever the input: no early exit on a match or a bad header.
    assert len(calls) == len(TOKENS)
    expected = {bytes.fromhex(hash_token(token)) for token in TOKENS.values()}
    assert {b for _, b in calls} == expected
    assert all(len(a) == 32 for a, _ in calls)  # the presented token's digest, never raw text
