"""meshrun crypto layer (see DESIGN.md §2)."""
