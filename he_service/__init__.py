"""Encrypted inference over HTTP: the Flask app factory and its parts."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers only: at run time the import below stays lazy
    from he_service.app import create_app

__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Import lazily so `he_service.protocol` users (the client SDK) never import flask.
    if name == "create_app":
        from he_service.app import create_app

        return create_app
    raise AttributeError(name)
