"""The job database and the event bus its changes are published on."""
