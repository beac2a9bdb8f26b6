"""`cotune run`: the main job on one machine, on the embedded stack.

Today it runs what exists before the coordinator: bring the embedded stack up (or use the
configured services), validate the spec, store it, shard the dataset into the object store,
write a summary into the output folder and stop the stack.

    cotune run examples/tiny/sweep.yaml --out out/tiny
"""

from __future__ import annotations

import json
import secrets
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.protocol.spec import SpecError, SweepSpec, load_spec
from orchestrator.settings import Settings

EXIT_INVALID = 2


def new_job_id(spec: SweepSpec) -> str:
    """A readable, unique job id: the spec's name and 8 random hex digits."""
    return f"{spec.name}-{secrets.token_hex(4)}"


def run_command(spec_path: Path, out: Path, settings: Settings) -> int:
    """Run the sweep at `spec_path`; return the process exit code."""
    console, err = Console(), Console(stderr=True)
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        for issue in exc.errors:
            err.print(f"[red]{escape(str(issue))}[/red]", soft_wrap=True)
        err.print(f"{len(exc.errors)} error(s) in {escape(str(spec_path))}; nothing was run")
        return EXIT_INVALID
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        err.print(f"[red]--out {escape(str(out))} exists and is not an empty folder[/red]")
        return EXIT_INVALID

    # Heavy modules load only once the input is known to be good.
    from orchestrator.objectstore import ObjectStore, ObjectStoreError
    from orchestrator.sharding import ShardingError, data_prefix, shard_to_store
    from orchestrator.stack import EmbeddedStack, StackError, settings_for_stack

    with ExitStack() as running:
        try:
            if settings.embedded:
                console.print(f"starting the embedded stack under {settings.home} ...")
                info = running.enter_context(EmbeddedStack(settings.home, settings.s3_bucket))
                settings = settings_for_stack(info, settings)
                console.print(f"stack ready in {info.startup_s:.1f} s: s3 {info.s3_endpoint}")
            store = ObjectStore.from_settings(settings)
            store.ensure_bucket()
            job_id = new_job_id(spec)
            store.put_bytes(f"jobs/{job_id}/spec.yaml", spec.to_yaml().encode())
            console.print(f"job [bold]{job_id}[/]: sharding {escape(spec.dataset.path)}")
            manifest = shard_to_store(
                spec.dataset.path,
                store=store,
                job_id=job_id,
                fmt=spec.dataset.format,
                shards=spec.dataset.shards,
                eval_split=spec.dataset.eval_split,
                seed=spec.dataset.seed,
                max_bad_rows=spec.dataset.max_bad_rows,
                progress=console.is_terminal,
            )
        except (StackError, ObjectStoreError, ShardingError) as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return 1

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "job_id": job_id,
        "data_prefix": data_prefix(job_id),
        "manifest": json.loads(manifest.to_json()),
    }
    (out / "job.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_manifest(console, job_id, manifest)
    console.print(
        f"wrote {escape(str(out / 'job.json'))}. Training the sweep needs the coordinator, "
        "which is not built yet: this run stops after sharding."
    )
    return 0


def _print_manifest(console: Console, job_id: str, manifest: object) -> None:
    table = Table(title=f"job {job_id}: dataset shards", title_justify="left")
    for column in ("split", "rows", "bytes", "sha256"):
        table.add_column(column, justify="right" if column in ("rows", "bytes") else "left")
    for split in manifest.files():  # type: ignore[attr-defined]
        table.add_row(split.name, f"{split.rows:,}", f"{split.bytes:,}", split.sha256[:16])
    console.print(table)
