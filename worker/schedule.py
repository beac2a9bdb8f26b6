"""The Trainer a task trains with: transformers' own, or one whose learning-rate schedule
spans more than the task (a trial's rounds: TrainTask.schedule_steps, schedule_offset)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cotune.orchestrator.protocol.task import TrainTask


def trainer_class(task: TrainTask) -> Any:
    """transformers' Trainer; with a schedule that spans more than this task (a trial's
    rounds), one whose learning rate follows steps [offset, offset + max_steps) of it."""
    from transformers import Trainer

    if task.schedule_steps is None:
        return Trainer
    total: int = task.schedule_steps
    offset = task.schedule_offset

    def shift(f: Callable[[int], float]) -> Callable[[int], float]:
        return lambda step: f(step + offset)

    class SpanningTrainer(Trainer):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                from torch.optim.lr_scheduler import LambdaLR
                from transformers import get_scheduler

                optimizer = optimizer or self.optimizer
                whole = get_scheduler(
                    self.args.lr_scheduler_type,
                    optimizer=optimizer,
                    num_warmup_steps=self.args.get_warmup_steps(total),
                    num_training_steps=total,
                )
                self.lr_scheduler = LambdaLR(optimizer, [shift(f) for f in whole.lr_lambdas])
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return SpanningTrainer
