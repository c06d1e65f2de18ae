"""A Hugging Face Trainer callback that checks the model's BatchNorm statistics when a checkpoint is due and when
training ends (``pip install 'bncheck[transformers]'``).

    from bncheck.integrations.transformers import BNCheckCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BNCheckCallback(fail_on="error")])
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from bncheck.config import Options
from bncheck.integrations import TrainingCheck
from bncheck.report import Severity


class BNCheckCallback(TrainerCallback):
    """Checks the model with every static rule (BN001-BN018) at the end of each step or epoch after which the
    Trainer will save (``control.should_save``: before the checkpoint is written), at ``on_save`` for a save it did
    not see coming (the checkpoint is then already on disk: the check still stops training, and bncheck deletes
    nothing), and at the end of training. Findings are logged on the ``bncheck`` logger; with ``fail_on`` (default
    ``"error"``) a finding at or above it raises BatchNormCheckError out of ``trainer.train()``. ``fail_on=None``
    only reports. ``options`` as for ``bncheck.inspect``; by default the project's pyproject.toml settings."""

    def __init__(self, *, fail_on: str | Severity | None = Severity.ERROR, options: Options | None = None) -> None:
        self.check = TrainingCheck(fail_on=fail_on, options=options)
        self.checked_step: int | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if control.should_save:
            self._run(state, kwargs.get("model"), f"before saving the checkpoint of step {state.global_step}")

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._run(state, kwargs.get("model"), f"before saving the checkpoint of step {state.global_step}")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.checked_step != state.global_step:
            self._run(state, kwargs.get("model"), f"after saving the checkpoint of step {state.global_step}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._run(state, kwargs.get("model"), "at the end of training")

    def _run(self, state: TrainerState, model: Any, when: str) -> None:
        if model is None:
            return
        self.checked_step = state.global_step
        # every process checks (and stops) alike; the main one alone reports
        report = self.check.inspect(model, when, say=state.is_world_process_zero)
        self.check.enforce(report, when)
