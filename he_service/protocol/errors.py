"""The one exception both sides raise when client bytes or card fields are malformed."""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """Bytes or fields that do not follow the wire protocol; the message says what to fix."""
