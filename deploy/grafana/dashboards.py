"""cotune's Grafana dashboards, as code: Overview, Job and Community, built with the Grafana
Foundation SDK (`grafana-foundation-sdk`) and committed as JSON under dashboards/.

    .venv/bin/python deploy/grafana/dashboards.py           # (re)write dashboards/*.json
    .venv/bin/python deploy/grafana/dashboards.py --check   # exit 1 naming each file that differs

Every panel queries the Prometheus datasource that provisioning/datasources/ provisions
(uid DATASOURCE_UID). The queries aggregate as deploy/prometheus/rules/ does: the cluster-wide
series (state gauges, counters and histograms kept in Redis) are repeated by every coordinator
replica, so they take the max over replicas, never the sum; the per-process series (API
latency, Redis and object-store errors, process_*) are summed. The coordinator exports every
label value, 0 included, so each query returns a series on an idle cluster too: zeros, not
"No data". `panel_queries()` lists every query with Grafana's variables filled in, for a test
that runs them on a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path
from typing import Any, NamedTuple

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE_UID = "cotune-prometheus"  # provisioning/datasources/prometheus.yml
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)

Panel = timeseries.Panel | stat.Panel | bargauge.Panel | table.Panel
Target = prometheus.Dataquery


class PanelQuery(NamedTuple):
    """One target of one panel, as Prometheus runs it."""

    dashboard: str  # the dashboard's uid
    panel: str  # the panel's title
    expr: str  # PromQL, Grafana's variables filled in


# --- panels ---------------------------------------------------------------------------------


def query(expr: str, legend: str = "", *, instant: bool = False, as_table: bool = False) -> Target:
    """A Prometheus target on DATASOURCE; `legend` names its series ("{{state}}")."""
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    if as_table:
        target = target.format(prometheus_models.PromQueryFormat.TABLE)
    return target.instant() if instant or as_table else target.range()


def finish(
    builder: Panel, title: str, about: str, unit: str, targets: tuple[Target, ...], w: int, h: int
) -> Panel:
    """`builder` with what every panel has: title, description, unit, datasource, targets
    (refIds A, B, ...) and its size on the 24-column grid."""
    builder = builder.title(title).description(about).unit(unit).datasource(DATASOURCE)
    for ref_id, target in zip(string.ascii_uppercase, targets, strict=False):
        builder = builder.with_target(target.ref_id(ref_id))
    return builder.span(w).height(h)


def graph(title: str, about: str, unit: str, *targets: Target, w: int = 12, h: int = 8) -> Panel:
    """A time series panel."""
    legend = common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.LIST)
    tooltip = common.VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI)
    builder = timeseries.Panel().fill_opacity(10).legend(legend.placement("bottom"))
    return finish(builder.tooltip(tooltip), title, about, unit, targets, w, h)


def number(title: str, about: str, unit: str, *targets: Target, w: int = 4, h: int = 4) -> Panel:
    """A stat panel: the last value of each series."""
    last = common.ReduceDataOptions().calcs(["lastNotNull"])
    builder = stat.Panel().reduce_options(last).graph_mode(common_models.BigValueGraphMode.AREA)
    return finish(builder, title, about, unit, targets, w, h)


def bars(title: str, about: str, unit: str, *targets: Target, w: int = 12, h: int = 8) -> Panel:
    """A horizontal bar gauge: one bar per series, its last value."""
    last = common.ReduceDataOptions().calcs(["lastNotNull"])
    builder = (
        bargauge.Panel()
        .reduce_options(last)
        .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
        .orientation(common_models.VizOrientation.HORIZONTAL)
        .min(0)
    )
    return finish(builder, title, about, unit, targets, w, h)


def quantiles(histogram: str, *qs: float) -> list[Target]:
    """Targets for the qs quantiles of a cluster-wide histogram (max over the replicas, which
    repeat it). A window without observations gives NaN: a gap in the graph."""
    rate = f"max by (le) (rate({histogram}_bucket[$__rate_interval]))"
    return [query(f"histogram_quantile({q}, {rate})", f"p{round(q * 100)}") for q in qs]


def assemble(
    uid: str,
    title: str,
    about: str,
    items: list[Panel | dashboard.Row],
    variables: tuple[dashboard.QueryVariable, ...] = (),
) -> dashboard.Dashboard:
    """A dashboard of `items` laid out left to right, top to bottom; a Row starts a line."""
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(about)
        .tags(["cotune"])
        .time("now-3h", "now")
        .refresh("30s")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables:
        board = board.with_variable(variable)
    for item in items:
        board = board.with_row(item) if isinstance(item, dashboard.Row) else board.with_panel(item)
    return board


# --- the dashboards -------------------------------------------------------------------------

PER_MINUTE = " Per minute, over the panel's rate interval."
ONLINE = "max by (kind, state) (cotune_workers)"
CREDITED = "max by (kind) (rate(cotune_tokens_trained_total[$__rate_interval]))"
REPORTED = "max by (kind) (cotune_training_tokens_per_second)"
REJECTIONS = "60 * max by (reason) (rate(cotune_rejections_total[$__rate_interval]))"


def overview() -> dashboard.Dashboard:
    return assemble(
        "cotune-overview",
        "cotune / Overview",
        "The whole cluster: jobs, tasks, queues, workers, throughput, failures, latency.",
        [
            dashboard.Row("Now"),
            number(
                "Coordinators up",
                "Coordinator replicas Prometheus scraped successfully.",
                "short",
                query('sum(up{job="cotune-coordinator"})'),
            ),
            number(
                "State readable",
                "1 when the coordinators read their state from Redis at the last scrape, 0 "
                "when Redis did not answer (the lowest over replicas).",
                "short",
                query("min(cotune_state_up)"),
            ),
            number(
                "Jobs running",
                "Jobs whose trials are training.",
                "short",
                query('max(cotune_jobs{state="running"})'),
            ),
            number(
                "Tasks queued",
                "Tasks waiting for a worker, all memory tiers.",
                "short",
                query("sum(max by (tier) (cotune_queue_depth))"),
            ),
            number(
                "Workers online",
                "Workers that called in within a lease TTL, busy or idle.",
                "short",
                query(f"sum({ONLINE})"),
            ),
            number(
                "Tokens/s",
                "Training throughput the workers report in the heartbeats of active leases.",
                "short",
                query(f"sum({REPORTED})"),
            ),
            dashboard.Row("Work"),
            graph(
                "Jobs by state",
                "Every job Redis holds, by state.",
                "short",
                query("max by (state) (cotune_jobs)", "{{state}}"),
            ),
            graph(
                "Tasks by state",
                "Tasks of unfinished jobs by state (redundancy duplicates included).",
                "short",
                query("max by (state) (cotune_tasks)", "{{state}}"),
            ),
            graph(
                "Queue depth by tier",
                "Queued tasks per memory tier: a tier that does not drain has no online "
                "worker that fits it.",
                "short",
                query("max by (tier) (cotune_queue_depth)", "{{tier}}"),
            ),
            graph(
                "Trials by state",
                "Trials of unfinished jobs by state.",
                "short",
                query("max by (state) (cotune_trials)", "{{state}}"),
            ),
            dashboard.Row("Workers and throughput"),
            graph(
                "Workers by kind and state",
                "Workers that called in within a lease TTL; busy ones hold a lease.",
                "short",
                query(ONLINE, "{{kind}} {{state}}"),
            ),
            graph(
                "Training throughput (tokens/s)",
                "Reported: the tokens/s workers report in the heartbeats of active leases. "
                "Credited: tokens of accepted results (the coordinator's count) per second.",
                "short",
                query(REPORTED, "reported {{kind}}"),
                query(CREDITED, "credited {{kind}}"),
            ),
            graph(
                "Step progress of active leases",
                "Steps done over steps to do, summed over the active leases of each kind (a "
                "gap while none is active).",
                "percentunit",
                query(
                    "max by (kind) (cotune_training_steps)"
                    " / max by (kind) (cotune_training_steps_target)",
                    "{{kind}}",
                ),
            ),
            graph(
                "Artifact traffic",
                "Bytes per second between workers and the object store: download (the inputs "
                "leases hand out) and upload (results verified in the store).",
                "Bps",
                query(
                    "max by (direction) (rate(cotune_artifact_bytes_total[$__rate_interval]))",
                    "{{direction}}",
                ),
            ),
            dashboard.Row("Failures and rejections"),
            graph(
                "Task attempts by outcome",
                "How attempts (one lease each) ended." + PER_MINUTE,
                "opm",
                query(
                    "60 * max by (outcome) (rate(cotune_task_attempts_total[$__rate_interval]))",
                    "{{outcome}}",
                ),
            ),
            graph(
                "Rejections by reason",
                "Rejected results by reason class (the job's events name the exact reason)."
                + PER_MINUTE,
                "opm",
                query(REJECTIONS, "{{reason}}"),
            ),
            number(
                "Tasks failed for good",
                "Tasks that failed for good in the time range (attempts used up, or a "
                "non-retryable failure), failing their trial.",
                "short",
                query("max(increase(cotune_tasks_failed_total[$__range]))", instant=True),
                w=6,
            ),
            number(
                "Task retries",
                "Failed or lost attempts whose task went back to the queue, in the time range.",
                "short",
                query("max(increase(cotune_task_retries_total[$__range]))", instant=True),
                w=6,
            ),
            number(
                "Jobs failed",
                "Jobs that ended failed in the time range.",
                "short",
                query(
                    'max(increase(cotune_jobs_finished_total{state="failed"}[$__range]))',
                    instant=True,
                ),
                w=6,
            ),
            number(
                "Owners quarantined",
                "Contributors (join token names) quarantined for their strikes.",
                "short",
                query("max(cotune_owners_quarantined)"),
                w=6,
            ),
            dashboard.Row("Latency"),
            graph(
                "Queue wait",
                "Time a task waited in the queue before a lease took it (each attempt).",
                "s",
                *quantiles("cotune_task_queue_wait_seconds", 0.5, 0.9),
            ),
            graph(
                "Task duration",
                "Time from lease to reported result of an attempt (training, upload, checks).",
                "s",
                *quantiles("cotune_task_duration_seconds", 0.5, 0.9),
            ),
            graph(
                "Merge and evaluation duration (p90)",
                "Per round: merging its shard adapters, and evaluating the merged adapter.",
                "s",
                *quantiles("cotune_merge_duration_seconds", 0.9),
                *quantiles("cotune_evaluation_duration_seconds", 0.9),
            ),
            graph(
                "API latency (p99) by route",
                "Time to the response's first byte, over all replicas.",
                "s",
                query(
                    "histogram_quantile(0.99, sum by (le, route) "
                    "(rate(cotune_api_request_duration_seconds_bucket[$__rate_interval])))",
                    "{{route}}",
                ),
            ),
            dashboard.Row("Coordinators"),
            number(
                "Versions",
                "Coordinator replicas by the cotune version they run.",
                "short",
                query("sum by (version) (cotune_build_info)", "{{version}}"),
                w=6,
                h=8,
            ),
            graph(
                "Redis and object store errors",
                "Calls that failed for want of Redis, and object store operations that failed "
                "after their retries, over all replicas." + PER_MINUTE,
                "opm",
                query("60 * sum(rate(cotune_redis_errors_total[$__rate_interval]))", "redis"),
                query(
                    "60 * sum(rate(cotune_object_store_errors_total[$__rate_interval]))",
                    "object store",
                ),
                w=9,
            ),
            graph(
                "Coordinator memory",
                "Resident memory of each coordinator process.",
                "bytes",
                query(
                    'sum by (instance) (process_resident_memory_bytes{job="cotune-coordinator"})',
                    "{{instance}}",
                ),
                w=9,
            ),
        ],
    )


def of_job(metric: str, state: str = "") -> str:
    """`metric`'s series of the job the `job` variable chose (in one state, if given)."""
    in_state = f', state="{state}"' if state else ""
    return f'{metric}{{job_id="$job"{in_state}}}'


def job() -> dashboard.Dashboard:
    chosen = (
        dashboard.QueryVariable("job")
        .label("Job")
        .description("A job the coordinator reports progress for.")
        .query("label_values(cotune_job_progress_ratio, job_id)")
        .datasource(DATASOURCE)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
    )
    progress = of_job("cotune_job_progress_ratio")
    start = of_job("cotune_job_start_time_seconds")
    rounds = f"max by (trial) ({of_job('cotune_trial_rounds_done')})"
    losses = f"max by (trial) ({of_job('cotune_trial_eval_loss')})"
    # One row per trial: the two instant queries joined on `trial`.
    trials = (
        table.Panel()
        .show_header(True)
        .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {"Value #A": "rounds done", "Value #B": "eval loss"},
                },
            )
        )
    )
    return assemble(
        "cotune-job",
        "cotune / Job",
        "One job's sweep: its trials' eval losses, pruning, task progress and ETA.",
        [
            number(
                "Progress",
                "Fraction of the job's trial-rounds done (ended trials count as done).",
                "percentunit",
                query(f"max({progress})"),
                w=6,
            ),
            number(
                "ETA",
                "Time left at the pace so far: elapsed × (1 − progress) / progress; no value "
                "until the first round is done.",
                "s",
                query(f"max((time() - {start}) * (1 - {progress}) / ({progress} > 0))"),
                w=6,
            ),
            number(
                "Running for",
                "Time since the job started.",
                "s",
                query(f"time() - max({start})"),
                w=6,
            ),
            number(
                "Pruned trials",
                "Trials the pruner stopped early (their losses lagged the others').",
                "short",
                query(f"max({of_job('cotune_job_trials', 'pruned')})"),
                w=6,
            ),
            graph(
                "Eval loss by trial",
                "Each trial's eval loss after its latest round: a step at each round.",
                "short",
                query(losses, "trial {{trial}}"),
            ),
            graph(
                "Rounds done by trial",
                "Rounds each trial has finished (a pruned trial stops climbing).",
                "short",
                query(rounds, "trial {{trial}}"),
            ),
            finish(
                trials,
                "Trials",
                "Each trial's rounds done and its latest eval loss.",
                "short",
                (query(rounds, as_table=True), query(losses, as_table=True)),
                12,
                8,
            ),
            bars(
                "Trials by state",
                "The job's trials by state.",
                "short",
                query(f"max by (state) ({of_job('cotune_job_trials')})", "{{state}}", instant=True),
            ),
            graph(
                "Tasks by state",
                "The job's tasks by state (redundancy duplicates included).",
                "short",
                query(f"max by (state) ({of_job('cotune_job_tasks')})", "{{state}}"),
            ),
            graph(
                "Task progress",
                "Trial-rounds done, and the job's tasks accepted over all its tasks so far.",
                "percentunit",
                query(f"max({progress})", "trial-rounds"),
                query(
                    f"max({of_job('cotune_job_tasks', 'accepted')})"
                    f" / sum(max by (state) ({of_job('cotune_job_tasks')}))",
                    "tasks accepted",
                ),
            ),
        ],
        variables=(chosen,),
    )


def community() -> dashboard.Dashboard:
    return assemble(
        "cotune-community",
        "cotune / Community",
        "Who trains: workers online by kind, their throughput, rejections, top contributors.",
        [
            number(
                "Workers online",
                "Workers that called in within a lease TTL, by kind.",
                "short",
                query(f"sum by (kind) ({ONLINE})", "{{kind}}"),
                w=8,
            ),
            number(
                "Tokens trained",
                "Tokens of the results accepted in the time range, by worker kind.",
                "short",
                query(
                    "max by (kind) (increase(cotune_tokens_trained_total[$__range]))",
                    "{{kind}}",
                    instant=True,
                ),
                w=8,
            ),
            number(
                "Contributors quarantined",
                "Join token names quarantined for their strikes: their leases were revoked.",
                "short",
                query("max(cotune_owners_quarantined)"),
                w=8,
            ),
            graph(
                "Workers online by kind",
                "Workers that called in within a lease TTL, and those of them holding a lease.",
                "short",
                query(f"sum by (kind) ({ONLINE})", "{{kind}}"),
                query(
                    'sum by (kind) (max by (kind, state) (cotune_workers{state="busy"}))',
                    "{{kind}} busy",
                ),
            ),
            graph(
                "Throughput by kind (tokens/s)",
                "Reported: what workers report in the heartbeats of active leases. Credited: "
                "tokens of accepted results per second.",
                "short",
                query(REPORTED, "reported {{kind}}"),
                query(CREDITED, "credited {{kind}}"),
            ),
            graph(
                "Rejections by reason",
                "Rejected results by reason class." + PER_MINUTE,
                "opm",
                query(REJECTIONS, "{{reason}}"),
            ),
            bars(
                "Rejections by reason (time range)",
                "Rejected results in the time range by reason class: intake (the cheap checks "
                "at completion), checks (finite values, step bound, probe loss), "
                "unverifiable, quarantined, redundancy (outvoted) and review (a round's "
                "outlier).",
                "short",
                query(
                    "max by (reason) (increase(cotune_rejections_total[$__range]))",
                    "{{reason}}",
                    instant=True,
                ),
            ),
            bars(
                "Top contributors",
                "Credited tokens of the ten contributors (join token names) with the most.",
                "short",
                query(
                    "sort_desc(max by (contributor) (cotune_contributor_tokens))",
                    "{{contributor}}",
                    instant=True,
                ),
            ),
            graph(
                "Peak training memory by kind",
                "The most memory a worker of each kind reports for an active lease.",
                "bytes",
                query("max by (kind) (cotune_training_memory_bytes)", "{{kind}}"),
            ),
        ],
    )


DASHBOARDS = {"overview.json": overview, "job.json": job, "community.json": community}


# --- output ---------------------------------------------------------------------------------


def as_json(board: dashboard.Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model, its panels numbered 1, 2, ... in order."""
    model = board.build()
    for panel_id, item in enumerate(model.panels or [], start=1):
        item.id_val = panel_id
    result: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    return result


def render(board: dashboard.Dashboard) -> str:
    """A dashboard file's text: sorted keys, two-space indents, a final newline."""
    return json.dumps(as_json(board), indent=2, sort_keys=True) + "\n"


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $name or ${name}


def panel_queries(
    job_id: str, *, rate_interval: str = "1m", time_range: str = "5m"
) -> list[PanelQuery]:
    """Every target of every panel of every dashboard, with Grafana's variables filled in:
    `$job` by `job_id`, `$__rate_interval` by `rate_interval`, `$__range` by `time_range`
    (Prometheus durations). Any other variable raises ValueError naming it."""
    values = {"job": job_id, "__rate_interval": rate_interval, "__range": time_range}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"panel_queries() has no value for the Grafana variable ${name}")
        return values[name]

    found = []
    for make in DASHBOARDS.values():
        model = as_json(make())
        for item in model["panels"]:
            for target in item.get("targets", []):
                found.append(
                    PanelQuery(model["uid"], item["title"], _VARIABLE.sub(fill, target["expr"]))
                )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write cotune's Grafana dashboards as JSON.")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is not up to date"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, make in DASHBOARDS.items():
        path, text = OUT_DIR / name, render(make())
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(path)
    for path in stale:
        print(f"{path}: differs from what deploy/grafana/dashboards.py generates", file=sys.stderr)
    if stale:
        print("regenerate: .venv/bin/python deploy/grafana/dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
