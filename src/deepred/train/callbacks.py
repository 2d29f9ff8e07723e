"""Trainer callbacks, one class each: the progress bar, the graceful stop on Ctrl-C/SIGTERM, the count of the steps
this process ran, the GPU memory probe."""

from __future__ import annotations

import signal
from typing import Callable

from transformers import TrainerCallback

from .memory import fit_token_budget
from .plan import BatchPlan


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps with the latest loss and the ETA."""

    def __init__(self):
        self.bar = None
        self.postfix = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar and logs:
            for key in ("loss", "eval_loss"):
                if key in logs:
                    self.postfix[key] = f"{logs[key]:.3f}"
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar:
            self.bar.close()


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: save a checkpoint at the current step and stop. A second one stops at once.
    `requested` names the signal once one came."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def _handler(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """The handlers from before training; also after a training that raised (on_train_end never ran)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class StepCount(TrainerCallback):
    """What this process trained, counted as it happens: the step it began at (a resumed run's checkpoint), the
    optimizer steps it took, and the learning rate its first step used. A run that claims to resume but starts
    over shows here as beginning at step 0, with the warm-up's first learning rate."""

    def __init__(self):
        self.began_at: int | None = None
        self.max_steps: int | None = None
        self.steps = 0
        self.first_step: int | None = None
        self.first_learning_rate: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.began_at is None:  # an out-of-memory retry begins again from a checkpoint; the process began here
            self.began_at = state.global_step
        self.max_steps = state.max_steps

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.first_step is None:  # the scheduler steps after the optimizer: this is the rate the step uses
            self.first_step = state.global_step + 1
            self.first_learning_rate = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def results(self) -> dict:
        """For train_results.json."""
        return {"resumed_from_step": self.began_at, "steps_this_process": self.steps,
                "first_step_this_process": self.first_step, "first_step_learning_rate": self.first_learning_rate}

    def describe(self) -> str:
        began = "resumed" if self.began_at else "started"
        text = f"{began} at step {self.began_at or 0} of {self.max_steps}, ran {self.steps} steps"
        if self.first_step is not None:
            text += f"; the first (step {self.first_step}) at learning rate {self.first_learning_rate:.4g}"
        return text


class MemoryProbe(TrainerCallback):
    """fit_token_budget when training begins: after the Trainer has turned on checkpointing and Liger's kernels,
    which change the memory a pass needs; `record` receives the plan with the budget. Out of memory here goes to
    the training flow's back-off like any other."""

    def __init__(self, trainer, plan: BatchPlan, lengths: list[int], log, record: Callable[[BatchPlan], None]):
        self.trainer, self.plan, self.lengths, self.log, self.record = trainer, plan, lengths, log, record

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(fit_token_budget(self.trainer, self.plan, self.lengths, self.log))
