"""The job pipeline: the reconciler and its steps, the Optuna study, rounds, round merges,
results."""
