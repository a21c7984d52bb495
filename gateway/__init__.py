"""An authentication gateway: accounts, tokens, route policy and identity-header forwarding."""

__version__ = "0.1.0"
