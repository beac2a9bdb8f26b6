"""cotune coordinator: API, state, queue, sweep logic, merge, Ray pool, metrics and the CLI."""
