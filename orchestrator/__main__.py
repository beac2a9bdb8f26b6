"""`python -m cotune.orchestrator` is the `cotune` command."""

from cotune.orchestrator.cli.app import main

if __name__ == "__main__":
    main()
