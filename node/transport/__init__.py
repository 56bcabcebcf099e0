"""The libp2p side of a node: host, gossip, framed streams, peers. Imports nothing from node."""
