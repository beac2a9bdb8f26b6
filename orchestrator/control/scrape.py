"""The collector behind `GET /metrics`: the cluster-wide series (control/metrics.py declares
every one) computed from Redis at each scrape, and the text exposition of them and of this
process's series.

    collector = StateCollector(state.scripts, state.clock, online_window_s=120.0)
    body = render(collector)               # served with metrics.CONTENT_TYPE

One read-only Lua script (lua/metrics.lua) takes the snapshot; every gauge here is built
from it with the name, help and labels `metrics.GAUGES` declares, every counter and
histogram from `metrics.COUNTERS` and `metrics.HISTOGRAMS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from cotune.orchestrator.control.metrics import (
    COUNTERS,
    GAUGE,
    HISTOGRAMS,
    PREFIX,
    TOP_CONTRIBUTORS,
    WORKER_KINDS,
    WORKER_STATES,
    RedisHistogram,
    count_error,
    counter_fields,
    process_exposition,
)
from cotune.orchestrator.control.records import text
from cotune.orchestrator.control.tiers import TIER_NAMES
from cotune.orchestrator.protocol.states import JOB_STATES, TASK_STATES, TRIAL_STATES
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)


class RunsScripts(Protocol):
    """What the collector needs of control/scripts.py `Scripts`."""

    def __call__(self, name: str, *args: object) -> Any: ...


class StateCollector:
    """The cluster-wide series, read from Redis at each scrape by lua/metrics.lua.

    What it counts (each family's HELP says more): every job by state; the trials
    and tasks of unfinished jobs by state (those of finished jobs stay in their counters);
    queued tasks per tier; workers that called in within `online_window_s` (a lease TTL:
    the time after which the coordinator gives up on a silent worker) by kind and busy/idle;
    quarantined owners; each running job's trials' latest eval loss; and the event counters
    and histograms. When Redis does not answer it yields only `cotune_state_up 0`, so the
    scrape still succeeds and says what is wrong.
    """

    def __init__(
        self, scripts: RunsScripts, clock: Callable[[], float], *, online_window_s: float
    ) -> None:
        if online_window_s <= 0:
            raise ValueError(f"online_window_s must be > 0, got {online_window_s}")
        self._scripts = scripts
        self._clock = clock
        self._window = online_window_s

    def snapshot(self) -> dict[str, Any]:
        """lua/metrics.lua's answer (raises when Redis does not answer)."""
        raw = self._scripts(
            "metrics",
            self._clock(),
            self._window,
            json.dumps(TIER_NAMES),
            TOP_CONTRIBUTORS,
            json.dumps(WORKER_KINDS),
        )
        snap: dict[str, Any] = json.loads(text(raw))
        return snap

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.snapshot()
        except Exception as exc:
            known = count_error(exc)  # Redis away: one line; anything else: its traceback
            log.warning("metrics: reading the state from Redis failed: %s", exc, exc_info=not known)
            yield _gauge("state_up", 0)
            return
        yield _gauge("state_up", 1)
        yield from _state_gauges(snap)
        yield from _counters(_pairs(snap.get("counters")))
        for h in HISTOGRAMS:
            yield _histogram(h, _pairs(snap.get("histograms", {}).get(h.name)))


def _family(name: str) -> GaugeMetricFamily:
    g = GAUGE[name]
    return GaugeMetricFamily(PREFIX + g.name, g.help, labels=g.labels)


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    g = GAUGE[name]
    return GaugeMetricFamily(PREFIX + g.name, g.help, value=value)


def _by(name: str, values: tuple[str, ...], counts: Any) -> GaugeMetricFamily:
    """A one-label gauge with one sample per value (0 where none), from {value: count}."""
    seen = _dict(counts)
    family = _family(name)
    for value in values:
        family.add_metric((value,), float(seen.get(value, 0)))
    return family


def _state_gauges(snap: dict[str, Any]) -> Iterator[Metric]:
    yield _by("jobs", JOB_STATES, snap["jobs"])
    yield _by("trials", TRIAL_STATES, snap["trials"])
    yield _by("tasks", TASK_STATES, snap["tasks"])
    yield _by("queue_depth", TIER_NAMES, snap["queue"])
    workers = _family("workers")
    seen = _dict(snap["workers"])
    for kind in WORKER_KINDS:
        for state in WORKER_STATES:
            workers.add_metric((kind, state), float(seen.get(f"{kind}:{state}", 0)))
    yield workers
    yield _gauge("owners_quarantined", float(snap["quarantined"]))
    yield from _job_gauges(snap)
    yield from _training_gauges(_dict(snap.get("training")))
    contributors = _family("contributor_tokens")
    for name, tokens in _pairs(snap.get("contributors")).items():
        contributors.add_metric((name,), float(tokens))
    yield contributors


def _job_gauges(snap: dict[str, Any]) -> Iterator[Metric]:
    """The series of each unfinished job: they end with it, so finished jobs leave none."""
    losses, rounds = _family("trial_eval_loss"), _family("trial_rounds_done")
    for job_id, number, loss, done in _list(snap["losses"]):
        losses.add_metric((str(job_id), str(number)), float(loss))
        rounds.add_metric((str(job_id), str(number)), float(done))
    yield losses
    yield rounds
    counts: dict[tuple[str, str], dict[str, float]] = {}
    for job_id, what, state, n in _list(snap.get("per_job")):
        counts.setdefault((str(job_id), str(what)), {})[str(state)] = float(n)
    progress = _list(snap.get("progress"))
    running = sorted({job for job, _ in counts} | {str(row[0]) for row in progress})
    for what, name, states in (
        ("trial", "job_trials", TRIAL_STATES),
        ("task", "job_tasks", TASK_STATES),
    ):
        family = _family(name)
        for job_id in running:
            seen = counts.get((job_id, what), {})
            for state in states:
                family.add_metric((job_id, state), seen.get(state, 0.0))
        yield family
    ratio, start = _family("job_progress_ratio"), _family("job_start_time_seconds")
    for job_id, fraction, created in progress:
        ratio.add_metric((str(job_id),), float(fraction))
        start.add_metric((str(job_id),), float(created))
    yield ratio
    yield start


# lua/metrics.lua's `training` rows, per kind: [tokens/s, largest memory, steps, max_steps].
_TRAINING = (
    "training_tokens_per_second",
    "training_memory_bytes",
    "training_steps",
    "training_steps_target",
)


def _training_gauges(by_kind: dict[str, Any]) -> Iterator[Metric]:
    """What workers report in their heartbeats, aggregated per kind (never per worker)."""
    for i, name in enumerate(_TRAINING):
        family = _family(name)
        for kind in WORKER_KINDS:
            row = _list(by_kind.get(kind))
            family.add_metric((kind,), float(row[i]) if len(row) > i else 0.0)
        yield family


def _counters(fields: dict[str, str]) -> Iterator[Metric]:
    unknown = sorted(set(fields) - counter_fields())
    if unknown:
        log.warning("metrics: undeclared counter fields in Redis (not exported): %s", unknown)
    for c in COUNTERS:
        labels = (c.label,) if c.label else ()
        family = CounterMetricFamily(PREFIX + c.name, c.help, labels=labels)
        for value in c.values if c.label else (None,):
            family.add_metric(
                (value,) if value is not None else (), float(fields.get(c.field(value), 0))
            )
        yield family


def _histogram(h: RedisHistogram, fields: dict[str, str]) -> Metric:
    cumulative, running = [], 0.0
    bounds = [*(repr(b) for b in h.buckets), "+Inf"]
    for i, bound in enumerate(bounds, start=1):
        running += float(fields.get(str(i), 0))
        cumulative.append((bound, running))
    family = HistogramMetricFamily(PREFIX + h.name, h.help)
    family.add_metric([], cumulative, sum_value=float(fields.get("sum", 0)))
    return family


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # Lua's cjson writes {} for an empty list


def _pairs(flat: Any) -> dict[str, str]:
    """HGETALL's flat [field, value, ...] reply (cjson: {} when empty) as a mapping."""
    items = _list(flat)
    return {text(k): text(v) for k, v in zip(items[::2], items[1::2], strict=True)}


def render(state: Collector) -> bytes:
    """The text exposition (CONTENT_TYPE) of `state`'s series and this process's.

    `state`'s families are written by `_text`, this process's by prometheus-client's
    `generate_latest`: the same format, but generate_latest validates and escapes every
    label name of every sample (about 17 us a sample here), which made a scrape of 100
    running jobs and 1,000 workers (2,000 samples) take 40 ms of Python alone; our label
    names are the fixed identifiers above, so only values need escaping.
    """
    return _text(state.collect()).encode() + process_exposition()


def _text(families: Iterable[Metric]) -> str:
    """Families in the Prometheus text format 0.0.4 (as generate_latest writes gauges,
    counters and histograms; label names must be valid identifiers, as all of ours are)."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        help = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sample.labels.items())
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out)


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value
