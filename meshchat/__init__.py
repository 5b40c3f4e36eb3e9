"""meshchat: chat with one language model split by layers across the machines of a LAN."""

__version__ = "0.1.0"
