"""The owner commands of the CLI: list owners with their strikes, quarantine one, pardon one
(the admin routes of orchestrator/api/routes_owners.py, through CotuneClient). The coordinator
and the admin token are found as for the job commands (orchestrator/cli/jobs.py).

    cotune owner list
    cotune owner quarantine mallory
    cotune owner pardon mallory
"""

from __future__ import annotations

from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.cli.jobs import Connection, run
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def owner_list_command(conn: Connection) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        listing = client.owners()
        table = Table(
            title=f"owners (quarantined at {listing.max_strikes:g} strikes)", title_justify="left"
        )
        for column in ("name", "strikes", "quarantined", "workers"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for owner in listing.owners:
            table.add_row(
                escape(owner.name),
                f"{owner.strikes:g}",
                "[red]yes[/]" if owner.quarantined else "no",
                str(owner.workers),
            )
        out.print(table)
        return 0

    return run(conn, action)


def owner_quarantine_command(conn: Connection, name: str) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        done = client.quarantine_owner(name)
        out.print(
            f"quarantined [bold]{escape(done.name)}[/] ({done.strikes:g} strikes): its workers "
            f"get no more work; {done.leases} active lease(s) revoked (their tasks are queued "
            f"again). Lift it with: cotune owner pardon {escape(done.name)}"
        )
        return 0

    return run(conn, action)


def owner_pardon_command(conn: Connection, name: str) -> int:
    def action(client: CotuneClient, out: Console) -> int:
        done = client.pardon_owner(name)
        lifted = "quarantine lifted" if done.quarantined else "it was not quarantined"
        out.print(
            f"pardoned [bold]{escape(done.name)}[/]: {done.strikes:g} strike(s) cleared, "
            f"{lifted}; its workers may lease again"
        )
        return 0

    return run(conn, action)
