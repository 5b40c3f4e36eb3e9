"""The OpenAI-compatible HTTP API a node can serve (`--api HOST:PORT`)."""
