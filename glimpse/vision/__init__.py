"""Step 5, the vision encoder at full speed: token-budget batching, captured graphs, eager fallback."""
