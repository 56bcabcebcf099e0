"""The JSON-RPC methods: node, storage and job verbs."""
