"""API tokens: hashing, the configured token table, and bearer authentication.

Operators configure ``api_tokens`` as ``name:sha256hex,name2:sha256hex``; the service stores
only hashes, so the configuration leaks no usable token. A request authenticates with
``Authorization: Bearer <token>``. Every failure (no header, a malformed header, an unknown
token) gets one and the same 401 message, and the comparison takes the same time whichever
entry matches, so neither the answer nor its timing tells a caller how close it came.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from he_service.errors import Unauthorized

__all__ = [
    "ANONYMOUS",
    "MAX_AUTHORIZATION_LENGTH",
    "UNAUTHORIZED_MESSAGE",
    "Principal",
    "TokenTable",
    "hash_token",
    "is_well_formed_token",
    "new_token",
]

# Far above a 43-character token plus "Bearer ", far below anything worth hashing at length:
# an attacker cannot make the server hash megabytes per request.
MAX_AUTHORIZATION_LENGTH = 512
UNAUTHORIZED_MESSAGE = (
    "missing or invalid API token; send the header 'Authorization: Bearer <token>' "
    "with a token the operator issued"
)
# Names become quota keys and context owners (and Redis keys), so keep them to a plain charset;
# a ':' or ',' would also make the configuration string ambiguous.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# RFC 6750 b64token: what a bearer token may be made of.
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_EMPTY_TOKEN_HASH = hashlib.sha256(b"").hexdigest()


def hash_token(token: str) -> str:
    """Return the sha256 hex digest of a token, the form operators put in ``api_tokens``.

    A plain, unsalted sha256 is right here, unlike for passwords: tokens are random strings
    with 256 bits of entropy (``new_token``), so no dictionary or brute force can invert the
    hash, and a slow KDF would only add latency to every request.

    Args:
        token: the secret token a client sends.

    Returns:
        64 lowercase hex characters.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """Return a fresh random API token (32 random bytes, URL-safe base64, 43 characters).

    Returns:
        The token to hand to a client; configure only ``hash_token(token)`` on the server.
    """
    return secrets.token_urlsafe(32)


def is_well_formed_token(token: str) -> bool:
    """Return whether a token can be sent as a bearer token and so can ever authenticate.

    Args:
        token: a candidate token, e.g. one an operator chose instead of ``new_token()``.

    Returns:
        True for 1 or more RFC 6750 token characters (letters, digits, ``-._~+/``, then
        optional ``=`` padding) that fit in the bounded ``Authorization`` header.
    """
    return (
        len(token) <= MAX_AUTHORIZATION_LENGTH - len("Bearer ")
        and _TOKEN68.fullmatch(token) is not None
    )


@dataclass(frozen=True)
class Principal:
    """Who made a request: the name of the configured token, or ``anonymous``."""

    name: str


# Every caller when tokens are off; the name is reserved so no token can claim it.
ANONYMOUS = Principal("anonymous")


class TokenTable:
    """The configured API tokens, as (principal, sha256 digest) pairs."""

    def __init__(self, entries: dict[str, bytes]) -> None:
        """Hold parsed entries; build one with ``TokenTable.parse``.

        Args:
            entries: principal name -> 32-byte sha256 digest of its token.
        """
        self._entries = tuple((Principal(name), digest) for name, digest in entries.items())

    @classmethod
    def parse(cls, spec: str) -> TokenTable:
        """Parse the ``api_tokens`` setting: ``name:sha256hex,name2:sha256hex``.

        Whitespace around entries, names and hashes is ignored, as is a trailing comma; an
        empty or blank spec turns authentication off. Error messages name the entry by position
        and never repeat its hash or text: an operator may have pasted a raw token by mistake.

        Args:
            spec: the setting's value.

        Returns:
            The table; ``enabled`` is false when ``spec`` is blank.

        Raises:
            ValueError: a malformed entry, a bad name, a duplicate name or hash, or a hash that
                is not 64 hex characters.
        """
        if not spec.strip():
            return cls({})
        entries: dict[str, bytes] = {}
        seen: set[bytes] = set()
        items = spec.split(",")
        if not items[-1].strip():
            items.pop()  # a trailing comma
        for position, item in enumerate(items, start=1):
            where = f"api_tokens entry {position}"
            if not item.strip():
                raise ValueError(f"{where} is empty; separate entries with one ','")
            name, colon, hexdigest = (part.strip() for part in item.partition(":"))
            if not colon:
                raise ValueError(
                    f"{where} is not 'name:sha256hex' (no ':'); "
                    "configure the hash of a token (he-service hash-token), never the token"
                )
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"{where}: the name must be 1-64 characters of letters, digits, '_', '.', "
                    "'@' or '-', starting with a letter or digit"
                )
            if name == ANONYMOUS.name:
                raise ValueError(
                    f"{where}: the name {name!r} is reserved for requests without auth"
                )
            if name in entries:
                raise ValueError(f"{where}: the name {name!r} appears twice")
            if not _SHA256_HEX.fullmatch(hexdigest):
                raise ValueError(
                    f"{where} ({name!r}): the hash must be 64 hex characters (a sha256 digest), "
                    f"got {len(hexdigest)} characters"
                    + ("" if len(hexdigest) != 64 else " that are not all hex")
                )
            if hexdigest.lower() == _EMPTY_TOKEN_HASH:
                raise ValueError(f"{where} ({name!r}): the hash is that of an empty token")
            digest = bytes.fromhex(hexdigest)
            if digest in seen:
                # One token for two names would make the principal depend on entry order.
                raise ValueError(f"{where} ({name!r}): the same hash as an earlier entry")
            seen.add(digest)
            entries[name] = digest
        return cls(entries)

    @property
    def enabled(self) -> bool:
        """Return whether requests need a token (at least one is configured)."""
        return bool(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Return the configured principal names, in configuration order."""
        return tuple(principal.name for principal, _ in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable(names={list(self.names)!r})"  # never the hashes

    def authenticate(self, authorization_header: str | None) -> Principal:
        """Return the principal of a request from its ``Authorization`` header.

        Args:
            authorization_header: the raw header value, or None when absent.

        Returns:
            ``ANONYMOUS`` when tokens are off, else the principal whose token was presented.

        Raises:
            Unauthorized: tokens are on and the header is missing, malformed or carries an
                unknown token (one message for all three).
        """
        if not self._entries:
            return ANONYMOUS
        token = _bearer_token(authorization_header)
        # A malformed header still runs the full comparison (against a hash no entry can have,
        # see parse), so every request does the same work whatever it sent.
        presented = hashlib.sha256((token or "").encode("utf-8")).digest()
        found: Principal | None = None
        for principal, digest in self._entries:
            # No early exit: every entry is compared, each in constant time, so the time does
            # not depend on which entry matches nor on how many leading bytes agree.
            if hmac.compare_digest(presented, digest):
                found = principal
        if token is None or found is None:
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        return found


def _bearer_token(header: str | None) -> str | None:
    """Return the token of a well-formed ``Bearer`` header, else None."""
    if header is None or len(header) > MAX_AUTHORIZATION_LENGTH:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    # Auth schemes are case-insensitive (RFC 9110 section 11.1).
    if scheme.lower() != "bearer" or not is_well_formed_token(credentials):
        return None
    return credentials
