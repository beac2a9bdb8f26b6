"""The `cotune` command line: the typer app, job commands, the HTTP client, progress views."""
