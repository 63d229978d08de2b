"""Steps 4 and 9 of the data path: the engine (scheduling, KV blocks, requests) and the sampler."""
