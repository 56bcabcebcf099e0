"""meshrun storage layer (see DESIGN.md §2)."""
