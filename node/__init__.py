"""meshrun node layer (see DESIGN.md §2)."""
