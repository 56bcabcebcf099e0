"""meshrun node layer: one room per job (transport, content, jobs, executor, roles, api, dev)."""
