"""Stage 7: one command from dataset to a deployed, evaluated persona (`deepred run`); demo.py runs it offline.

    manifest.py   content hashes, fingerprints, manifest.json, skip or rerun
    training.py   the train, pairs and prefer stages
    evaluation.py the evaluate stage: base and tuned served and scored, the base model's answers kept
    stages.py     merge, convert, check, deploy, and the table of every stage
    run.py        run_pipeline(): the stages in order, the model cards

Each stage is a function of its inputs. Before running a stage the pipeline fingerprints those inputs (settings,
and content hashes of the files it reads); `manifest.json` in the run folder keeps, per stage, the fingerprint, the
outputs and their content hash. A re-run skips a stage whose fingerprint and outputs are unchanged, reruns one whose
inputs changed (and says which), and resumes an interrupted training from its newest checkpoint. Downstream stages
hash their upstream outputs, so a retrained adapter invalidates the merge, the GGUFs and the evaluation by itself.
"""

from .manifest import Manifest, Run, StageFailed
from .run import run_pipeline, write_run_cards
from .stages import STAGE_FUNCTIONS

__all__ = ["Manifest", "Run", "STAGE_FUNCTIONS", "StageFailed", "run_pipeline", "write_run_cards"]
