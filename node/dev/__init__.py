"""Developer tools built on the public client: the local devstack, the demo, synthetic models."""
