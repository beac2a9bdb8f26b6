"""The Redis control plane: keys, records, Lua scripts, state, queue, leases, tokens, workers."""
