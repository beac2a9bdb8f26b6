"""The job study: Optuna on the real Redis journal, samplers, pruners, crash-safe ask."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from cotune.orchestrator.pipeline.study import (
    JobStudy,
    decode_params,
    distributions,
    step_of,
)
from cotune.orchestrator.protocol.spec import parse_spec
from cotune.orchestrator.protocol.spec.checks import effective_trials

pytestmark = pytest.mark.integration
optuna = pytest.importorskip("optuna", reason="the study needs the coordinator extra")


def spec_of(**search: Any) -> Any:
    data: dict[str, Any] = {
        "name": "study-test",
        "base_model": "cotune://tiny-llama",
        "dataset": {"path": "s3://bucket/data.jsonl", "format": "alpaca", "shards": 2},
        "training": {
            "max_steps": 4,
            "learning_rate": {"loguniform": [1e-4, 1e-2]},
        },
        "lora": {
            "lora_r": [4, 8],
            "lora_target_modules": {"choice": [["q_proj", "v_proj"], "all-linear"]},
        },
        "rounds": 3,
        "search": {"method": "random", "n_trials": 4, **search},
    }
    return parse_spec(data)


def open_study(redis_server: str, spec: Any, name: str | None = None) -> JobStudy:
    name = name or f"job-{uuid.uuid4().hex[:8]}"
    return JobStudy.open(redis_server, f"cotune-test:optuna:{name}", name, spec)


def test_distributions_map_every_dimension_and_list_choices_round_trip() -> None:
    spec = spec_of()
    dists = distributions(spec)
    assert set(dists) == {"training.learning_rate", "lora.lora_r", "lora.lora_target_modules"}
    assert dists["training.learning_rate"].log is True  # type: ignore[attr-defined]
    labels = dists["lora.lora_target_modules"].choices  # type: ignore[attr-defined]
    assert all(isinstance(label, str) for label in labels)
    decoded = decode_params(spec, {"lora.lora_target_modules": labels[0], "lora.lora_r": 4})
    assert decoded["lora.lora_target_modules"] == ["q_proj", "v_proj"]
    # Every decoded trial makes a valid concrete spec.
    assert spec.with_params(decoded).is_concrete()


def test_ask_samples_every_parameter_and_the_journal_survives_a_new_process_view(
    redis_server: str,
) -> None:
    spec = spec_of()
    study = open_study(redis_server, spec)
    first = study.ask()
    second = study.ask()
    assert (first.number, second.number) == (0, 1)
    assert set(first.params) == set(spec.search_space())
    spec.with_params(first.params)  # values are in range and of the right kind
    # A second view on the same journal (a restarted coordinator) sees the same trials.
    again = JobStudy.open(redis_server, study.storage._backend._prefix, study.name, spec)  # type: ignore[attr-defined]
    assert again.asked() == 2
    assert again.params_of(0) == first.params


def test_an_asked_trial_without_a_record_is_adopted_not_asked_again(redis_server: str) -> None:
    spec = spec_of()
    study = open_study(redis_server, spec)
    recorded = study.ask()
    lost = study.ask()  # the coordinator died before writing this one's record
    orphans = study.orphans(known={recorded.number})
    assert orphans == [lost]
    assert study.asked() == 2  # adopting asks nothing


def test_a_half_sampled_orphan_gets_its_missing_parameters(redis_server: str) -> None:
    spec = spec_of()
    study = open_study(redis_server, spec)
    # Simulate a crash inside ask: the trial exists with one parameter of three.
    raw = optuna.Study(study.name, study.storage, sampler=optuna.samplers.RandomSampler(0))
    trial = raw.ask()
    trial.suggest_categorical("lora.lora_r", [4, 8])
    [orphan] = study.orphans(known=set())
    assert set(orphan.params) == set(spec.search_space())
    assert orphan.params["lora.lora_r"] == trial.params["lora.lora_r"]
    assert study.params_of(orphan.number) == orphan.params  # now stored: stable


def test_reseeded_sampler_gives_the_same_suggestions_after_a_restart(redis_server: str) -> None:
    spec = spec_of()
    a, b = open_study(redis_server, spec), open_study(redis_server, spec)
    seq_a = [a.ask().params for _ in range(3)]
    seq_b = [b.ask().params for _ in range(2)]
    # "Restart": a new view on b's journal continues the same sequence.
    b2 = JobStudy.open(redis_server, b.storage._backend._prefix, b.name, spec)  # type: ignore[attr-defined]
    seq_b.append(b2.ask().params)
    assert seq_a == seq_b
    assert len({repr(p) for p in seq_a}) == 3  # and they do differ from trial to trial


def test_grid_covers_every_combination_once(redis_server: str) -> None:
    data = spec_of().model_dump(mode="json")
    data["training"]["learning_rate"] = [1e-3, 1e-2]
    data["lora"]["lora_target_modules"] = "all-linear"
    data["search"] = {"method": "grid"}
    spec = parse_spec(data)
    assert effective_trials(spec) == 4
    study = open_study(redis_server, spec)
    seen = {tuple(sorted(study.ask().params.items())) for _ in range(4)}
    assert len(seen) == 4


def test_median_pruner_prunes_a_trial_worse_than_the_median_at_its_round(
    redis_server: str,
) -> None:
    spec = spec_of(pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    study = open_study(redis_server, spec)
    good = study.ask().number
    for rnd, loss in enumerate([2.0, 1.5, 1.2]):
        study.report(good, rnd, loss)
    study.tell(good, "complete", 1.2)
    bad, better = study.ask().number, study.ask().number
    study.report(bad, 0, 3.0)
    study.report(better, 0, 1.9)
    assert study.should_prune(bad) is True
    assert study.should_prune(better) is False
    study.tell(bad, "pruned")
    assert study.state_of(bad) == "pruned"
    assert study.should_prune(bad) is True  # asked again after the tell: the same answer


def test_report_and_tell_are_idempotent(redis_server: str) -> None:
    spec = spec_of()
    study = open_study(redis_server, spec)
    n = study.ask().number
    study.report(n, 0, 2.0)
    study.report(n, 0, 9.0)  # a replay after a crash: the first value stays
    assert study.frozen(n).intermediate_values == {step_of(0): 2.0}
    study.tell(n, "complete", 1.0)
    study.tell(n, "complete", 5.0)
    study.tell(n, "failed")
    frozen = study.frozen(n)
    assert (frozen.state.name, frozen.value) == ("COMPLETE", 1.0)


def test_successive_halving_and_hyperband_use_rounds_as_resource(redis_server: str) -> None:
    sha = spec_of(pruner={"type": "successive_halving", "min_resource": 1, "reduction_factor": 2})
    study = open_study(redis_server, sha)
    first, second = study.ask().number, study.ask().number
    study.report(first, 0, 1.0)
    assert study.should_prune(first) is False  # alone at the first rung: promoted
    study.report(second, 0, 2.0)
    assert study.should_prune(second) is True  # worse than the one above it at that rung
    hyper = spec_of(pruner={"type": "hyperband", "min_resource": 1, "reduction_factor": 2})
    open_study(redis_server, hyper).ask()  # builds (max_resource auto = rounds) and samples


def test_telling_the_last_grid_point_does_not_raise(redis_server: str) -> None:
    data = spec_of().model_dump(mode="json")
    data["training"]["learning_rate"] = [1e-3, 1e-2]
    data["lora"] = {"lora_r": 4}
    data["search"] = {"method": "grid"}
    spec = parse_spec(data)
    study = open_study(redis_server, spec)
    numbers = [study.ask().number for _ in range(2)]
    for n in numbers:  # the grid's own after_trial would call Study.stop() here and raise
        study.tell(n, "pruned")
    assert [study.state_of(n) for n in numbers] == ["pruned", "pruned"]


def test_tpe_asks_with_history_and_is_restart_stable(redis_server: str) -> None:
    spec = spec_of(method="tpe")
    a, b = open_study(redis_server, spec), open_study(redis_server, spec)
    for study in (a, b):
        for n in range(3):
            asked = study.ask()
            study.report(asked.number, 0, 1.0 + n)
            study.tell(asked.number, "complete", 1.0 + n)
    b2 = JobStudy.open(redis_server, b.storage._backend._prefix, b.name, spec)  # type: ignore[attr-defined]
    assert a.ask().params == b2.ask().params
