"""Training, one concern per module, in the order `stage.train` uses them:

    run_dir.py    the training folder: checkpoints, resume with the recorded settings, final/
    hardware.py   device, precision, how the run was launched
    examples.py   tokenized with the model's chat template, sampled, cut, split
    plan.py       the batch plan (pure): how the effective batch is computed on this hardware
    model.py      the model in its dtype (bitsandbytes on CUDA) and its LoRA adapter
    loss.py       the output layer on the supervised positions only; packed batches cut to a token budget
    trainer.py    TRL's SFTTrainer (and our subclass) with the plan's arguments
    callbacks.py  progress bar, graceful stop, the steps this process ran, memory probe
    memory.py     the memory probe's search and the out-of-memory back-off
    report.py     run_config.json, results, the loss curve, the next commands
    stage.py      train(): the flow top to bottom
"""

from .run_dir import TrainResult
from .stage import train

__all__ = ["TrainResult", "train"]
