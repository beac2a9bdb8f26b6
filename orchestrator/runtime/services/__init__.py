"""The embedded services cotune runs itself: supervised redis-server and `weed` processes.

`process` supervises one child (log file, readiness wait, stop without orphans); `redis_server`
and `seaweed_server` configure the two services (and restart one that died, on its ports);
`supervisor` bounds how often that may happen; `credentials` and `stackfile` hold the state
runtime/stack.py keeps in a home folder. Everything here needs the coordinator extra.
"""
