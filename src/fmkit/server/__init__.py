"""`fmkit serve`: local models over the OpenAI HTTP API, with continuous batching (docs/serve.md).

launch (the verb, `Background`) -> app (routes, keys, limits, metrics) -> generation / embed (requests to engine
work and back to responses) -> pool (models loaded on demand) -> engine (one thread per model: the batch) ->
sampling, constrain (the next token).
"""
