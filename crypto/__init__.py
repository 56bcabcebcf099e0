"""Keys, signed envelopes and receipts (DESIGN §3, §7)."""
