"""Keys, signed envelopes and receipts (docs/design.md: wire protocol, trust model)."""
