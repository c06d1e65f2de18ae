"""A Lightning callback that checks the model's BatchNorm statistics before each checkpoint is written and at the
end of fit (``pip install 'bncheck[lightning]'``).

    from bncheck.integrations.lightning import BNCheck

    trainer = Trainer(callbacks=[BNCheck(fail_on="error")])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from bncheck.config import Options
from bncheck.integrations import TrainingCheck, counts
from bncheck.report import Severity


class BNCheck(Callback):
    """Checks the LightningModule with every static rule (BN001-BN018) when Lightning assembles a checkpoint
    (``on_save_checkpoint``, before anything is written) and at the end of fit. The counts of findings go to the
    trainer's loggers (``bncheck/errors``, ``bncheck/warnings``, ``bncheck/infos``), the findings to the console.
    With ``fail_on`` (default ``"error"``) a finding at or above it raises BatchNormCheckError: the checkpoint is not
    written and ``trainer.fit`` ends with the message. ``fail_on=None`` only reports. ``options`` as for
    ``bncheck.inspect``; by default the project's pyproject.toml settings, as the command line reads them."""

    def __init__(self, *, fail_on: str | Severity | None = Severity.ERROR, options: Options | None = None) -> None:
        self.check = TrainingCheck(fail_on=fail_on, options=options)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._run(trainer, pl_module, f"before saving the checkpoint of step {trainer.global_step}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module, "at the end of fit")

    def _run(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        # every rank checks (and stops) alike, so that no rank goes on alone; rank 0 alone reports
        report = self.check.inspect(pl_module, when, say=trainer.is_global_zero)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(counts(report), step=trainer.global_step)
        self.check.enforce(report, when)
