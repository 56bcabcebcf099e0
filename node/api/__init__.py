"""How a node's owner drives it: JSON-RPC, REST, WebSocket, the gateway, and their auth."""
