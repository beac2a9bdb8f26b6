"""A job's hyperparameter search: an Optuna study (ask/tell) stored in Redis.

Each job has one study, kept by Optuna's JournalStorage on Redis (`JournalRedisBackend`,
under the key prefix `optuna:<job>`), so a restarted coordinator sees every trial that was
asked, every intermediate value reported and every decision told. What this module adds:

- the spec's search dimensions as Optuna distributions (`distributions`): choices whose
  values are lists (lora_target_modules) travel as JSON string labels, decoded back by
  `decode_params`;
- samplers (grid, random, TPE) and pruners (successive halving, Hyperband, median) built
  from the spec;
- rounds as the pruners' steps: after round r (0-based) the merged adapter's eval loss is
  reported at step r + 1, the number of rounds the trial has used, so `min_resource` and
  `n_warmup_steps` count rounds as the spec documents them;
- a crash-safe ask. `ask` samples every parameter at once (fixed distributions) and the
  reconciler writes the trial's record afterwards; a coordinator killed between the two
  leaves a RUNNING Optuna trial without a record, which `orphans` returns on restart so it
  is adopted, never asked again. A half-sampled orphan gets its missing parameters filled
  in (`params_of`).
- a sampler seeded from (spec seed, trials asked so far) on every ask, so the sequence of
  suggestions does not depend on when the coordinator restarted (the grid sampler keeps
  the spec's seed: trial n takes the n-th point of the grid shuffled by it).

    study = JobStudy.open(redis_url, state.keys.optuna(job_id), job_id, spec)
    trial = study.ask()                        # AskedTrial(number=0, params={...})
    study.report(0, round=0, value=2.1); study.should_prune(0)
    study.tell(0, value=1.9)                   # or tell(0, state="pruned" | "failed")
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cotune.orchestrator.protocol.search_space import (
    Choice,
    IntRange,
    LogUniform,
    SearchDim,
    Uniform,
)
from cotune.orchestrator.protocol.spec.checks import effective_trials

if TYPE_CHECKING:
    import optuna
    from cotune.orchestrator.protocol.spec import SweepSpec
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

TellState = Literal["complete", "pruned", "failed"]
_PRIMITIVE = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class AskedTrial:
    """A trial as the reconciler sees it: Optuna's number and the spec's parameter values."""

    number: int
    params: dict[str, Any]


def _needs_labels(dim: Choice) -> bool:
    return any(not isinstance(v, _PRIMITIVE) for v in dim.grid_values() or ())


def _label(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def distribution_of(dim: SearchDim) -> BaseDistribution:
    """The Optuna distribution of one search dimension."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(dim, Choice):
        values = dim.grid_values() or ()
        if _needs_labels(dim):
            return CategoricalDistribution([_label(v) for v in values])
        return CategoricalDistribution(list(values))
    if isinstance(dim, Uniform):
        return FloatDistribution(dim.lo, dim.hi)
    if isinstance(dim, LogUniform):
        return FloatDistribution(dim.lo, dim.hi, log=True)
    if isinstance(dim, IntRange):
        return IntDistribution(dim.lo, dim.hi, log=dim.log, step=dim.step)
    raise TypeError(f"not a search dimension: {dim!r}")


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """Every search dimension of the spec as an Optuna distribution, by dotted path."""
    return {path: distribution_of(dim) for path, dim in spec.search_space().items()}


def grid_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """The grid sampler's axes: each dimension's values (labels for list values)."""
    space: dict[str, list[Any]] = {}
    for path, dim in spec.search_space().items():
        values = dim.grid_values()
        if values is None:
            raise ValueError(f"{path}: {dim.describe()} has no grid; use method random or tpe")
        labelled = isinstance(dim, Choice) and _needs_labels(dim)
        space[path] = [_label(v) for v in values] if labelled else list(values)
    return space


def decode_params(spec: SweepSpec, raw: dict[str, Any]) -> dict[str, Any]:
    """Optuna's parameter values as the spec's values (labels back to lists)."""
    space = spec.search_space()
    params: dict[str, Any] = {}
    for path, value in raw.items():
        dim = space.get(path)
        if isinstance(dim, Choice) and _needs_labels(dim) and isinstance(value, str):
            value = json.loads(value)
        params[path] = value
    return params


def max_concurrent(spec: SweepSpec) -> int:
    """Trials in flight at once (null in the spec: all of them)."""
    return spec.search.max_concurrent_trials or effective_trials(spec)


def sampler_for(spec: SweepSpec, asked: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded from (search.seed, trials asked so far).

    The grid sampler keeps the spec's seed: it shuffles the grid with it once and gives
    trial n the n-th point, so the seed must not change between asks.
    """
    import optuna

    method = spec.search.method
    if method == "grid":
        return _ask_tell_grid(grid_space(spec), spec.search.seed)
    digest = hashlib.sha256(f"{spec.search.seed}/{asked}".encode()).digest()
    seed = int.from_bytes(digest[:4], "big")
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _ask_tell_grid(space: dict[str, list[Any]], seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's GridSampler, minus its `after_trial`: that calls `Study.stop()` once the grid
    is covered, which raises outside `optimize()`. The reconciler counts trials itself."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return AskTellGridSampler(space, seed=seed)


def pruner_for(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; rounds are its steps (see the module docstring)."""
    import optuna

    p = spec.search.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps,
            interval_steps=p.interval_steps,
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource,
            reduction_factor=p.reduction_factor,
            min_early_stopping_rate=p.min_early_stopping_rate,
        )
    if p.type == "hyperband":
        top = spec.rounds if p.max_resource == "auto" else p.max_resource
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=top, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def step_of(round: int) -> int:
    """The pruner step of a round: the rounds used so far (round 0 -> step 1)."""
    return round + 1


class JobStudy:
    """One job's Optuna study on Redis; see the module docstring."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str, spec: SweepSpec) -> None:
        self.storage = storage
        self.name = name
        self.spec = spec
        self._distributions = distributions(spec)

    @classmethod
    def open(cls, redis_url: str, key_prefix: str, name: str, spec: SweepSpec) -> JobStudy:
        """The job's study (created on first use) in the journal under `key_prefix`."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalRedisBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # the Redis journal backend is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = JournalStorage(JournalRedisBackend(redis_url, prefix=key_prefix))
        direction = spec.search.direction
        optuna.create_study(
            storage=storage, study_name=name, direction=direction, load_if_exists=True
        )
        return cls(storage, name, spec)

    def _study(self, asked: int | None = None) -> optuna.Study:
        import optuna

        count = self.asked() if asked is None else asked
        return optuna.Study(
            self.name,
            self.storage,
            sampler=sampler_for(self.spec, count),
            pruner=pruner_for(self.spec),
        )

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self._study(0).get_trials(deepcopy=False)

    def asked(self) -> int:
        """Trials asked so far, whatever their state."""
        import optuna

        return len(optuna.Study(self.name, self.storage).get_trials(deepcopy=False))

    def frozen(self, number: int) -> optuna.trial.FrozenTrial:
        trials = self.trials()
        if not 0 <= number < len(trials) or trials[number].number != number:
            raise KeyError(f"study {self.name} has no trial {number}")
        return trials[number]

    def ask(self) -> AskedTrial:
        """A new trial with every parameter sampled (one journal entry per parameter)."""
        study = self._study()
        trial = study.ask(fixed_distributions=dict(self._distributions))
        return AskedTrial(trial.number, decode_params(self.spec, trial.params))

    def orphans(self, known: set[int]) -> list[AskedTrial]:
        """RUNNING trials without a record (asked by a coordinator that died before writing
        it), with every parameter; the reconciler adopts them instead of asking anew."""
        import optuna

        found = []
        for frozen in self.trials():
            if frozen.state == optuna.trial.TrialState.RUNNING and frozen.number not in known:
                found.append(AskedTrial(frozen.number, self.params_of(frozen.number)))
        return found

    def params_of(self, number: int) -> dict[str, Any]:
        """The trial's parameters, sampling any that a crash left unsampled."""
        import optuna

        frozen = self.frozen(number)
        raw = dict(frozen.params)
        missing = {n: d for n, d in self._distributions.items() if n not in raw}
        if missing and frozen.state == optuna.trial.TrialState.RUNNING:
            trial = optuna.trial.Trial(self._study(), frozen._trial_id)
            for name, dist in missing.items():
                raw[name] = trial._suggest(name, dist)
        return decode_params(self.spec, raw)

    def report(self, number: int, round: int, value: float) -> None:
        """The eval loss after `round`; reporting the same round again changes nothing."""
        import optuna

        frozen = self.frozen(number)
        if step_of(round) in frozen.intermediate_values:
            return
        if frozen.state != optuna.trial.TrialState.RUNNING:
            return
        optuna.trial.Trial(self._study(), frozen._trial_id).report(value, step_of(round))

    def should_prune(self, number: int) -> bool:
        """The pruner's decision on the trial's latest reported round."""
        import optuna

        frozen = self.frozen(number)
        if frozen.state != optuna.trial.TrialState.RUNNING:
            return frozen.state == optuna.trial.TrialState.PRUNED
        return bool(optuna.trial.Trial(self._study(), frozen._trial_id).should_prune())

    def tell(self, number: int, state: TellState, value: float | None = None) -> None:
        """Finish the trial in Optuna; a trial already finished is left as it is."""
        import optuna

        states = {
            "complete": optuna.trial.TrialState.COMPLETE,
            "pruned": optuna.trial.TrialState.PRUNED,
            "failed": optuna.trial.TrialState.FAIL,
        }
        if state == "complete" and value is None:
            raise ValueError(f"trial {number}: a complete trial needs its final value")
        self._study().tell(
            number,
            value if state == "complete" else None,
            state=states[state],
            skip_if_finished=True,
        )

    def state_of(self, number: int) -> str:
        """Optuna's state of the trial, lower case (running, complete, pruned, fail)."""
        return self.frozen(number).state.name.lower()
