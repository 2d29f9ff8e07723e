"""Trainer callbacks, one class each: the progress bar, the graceful stop on Ctrl-C/SIGTERM, the GPU memory probe."""

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
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class MemoryProbe(TrainerCallback):
    """fit_token_budget when training begins: after the Trainer has turned on checkpointing and Liger's kernels,
    which change the memory a pass needs; `record` receives the plan with the budget. Out of memory here goes to
    the training flow's back-off like any other."""

    def __init__(self, trainer, plan: BatchPlan, lengths: list[int], log, record: Callable[[BatchPlan], None]):
        self.trainer, self.plan, self.lengths, self.log, self.record = trainer, plan, lengths, log, record

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(fit_token_budget(self.trainer, self.plan, self.lengths, self.log))
