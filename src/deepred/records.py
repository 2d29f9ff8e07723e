"""The files through which the stages hand work to each other: their names and what each holds. A table module
like quant_types.py; the stage that writes a record owns its content, the others read it.

    training folder (RUN/)   run_config.json   every resolved setting (paths absolute), dataset sha256, batch plan,
                                               hardware
                             train_results.json, eval_results.json   the Trainer's metrics
                             final/            the adapter (adapter_config.json names its base model)
    merged folder            deepred_merge.json   which adapter and base model it was merged from, and the dtype
    built-in base model      deepred_source.json  the released model a built-in was rebuilt from, and its licence
    `deepred run` folder     manifest.json     per stage: its input fingerprint, outputs and their content hash
    any model folder         README.md         the model card (rewritten, so never part of a content hash)
"""

from __future__ import annotations

from pathlib import Path

RUN_CONFIG = "run_config.json"
TRAIN_RESULTS = "train_results.json"
EVAL_RESULTS = "eval_results.json"
FINAL = "final"
MERGE_RECORD = "deepred_merge.json"
SOURCE_RECORD = "deepred_source.json"
MANIFEST = "manifest.json"
CARD = "README.md"
PATH_SETTINGS = {"pairs", "init_adapter", "persona", "period_answers"}  # files and folders a training run reads


def with_absolute_paths(settings: dict) -> dict:
    """The settings with each file or folder of PATH_SETTINGS that exists made absolute: run_config.json records
    them so, and a resume (or a model card) from another folder finds them."""
    return {name: str(Path(value).expanduser().absolute())
            if name in PATH_SETTINGS and isinstance(value, str) and Path(value).expanduser().exists() else value
            for name, value in settings.items()}


def train_dir_of_adapter(adapter: Path) -> Path | None:
    """The training folder of an adapter (RUN/final -> RUN), when it holds a run_config.json."""
    folder = Path(adapter).parent
    return folder if (folder / RUN_CONFIG).is_file() else None
