"""The OpenAI-compatible HTTP server: request protocol, media fetching, async engine, reasoning parser, metrics."""
