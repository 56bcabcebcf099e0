"""What a node stores and where it looks: block exchange, provider announcements, pins, fetch."""
