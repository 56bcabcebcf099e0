"""The Python SDK's implementation; import it from `node.client`, its public path.

- `core`: sans-io (requests, replies, errors, retry policy, SSE parsing);
- `ops`: every operation, once, as a generator of effects;
- `clients`: `Client` and `AsyncClient`, carrying those effects out over httpx;
- `models`: the typed results;
- `discovery`: finding a node and its token.
"""
