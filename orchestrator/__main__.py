"""`python -m orchestrator` is the `cotune` command."""

from orchestrator.cli import main

main()
