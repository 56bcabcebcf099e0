"""The two things a node can be: a requester (submits jobs) or a compute node (runs them)."""
