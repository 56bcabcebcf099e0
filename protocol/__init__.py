"""Pure protocol logic for meshrun: message types, canonical encoding, limits,
the job state machine and the market. Sans-io: nothing here touches a socket,
a file, a clock or an event loop; callers feed in bytes and time."""
