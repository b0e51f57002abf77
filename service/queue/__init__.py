"""The Redis side of the service, used by every process: the key layout, the client, the job store and
the Lua scripts that move jobs between states."""
