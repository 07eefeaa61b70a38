"""The broker as an OAuth authorization server for tools: its access tokens signed by a key held in
OpenBao's transit engine (`signing`), and what it publishes about itself (`metadata`). Knows
nothing of HTTP and never holds a private key."""

from .metadata import server_metadata
from .signing import SignedToken, TokenSigner

__all__ = ["SignedToken", "TokenSigner", "server_metadata"]
