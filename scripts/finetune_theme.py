#!/usr/bin/env python3
"""Phase 4 theme fine-tuning: LoRA SFT of a base model on the Deep Red ChatML dataset (same code as `deepred train`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepred.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(only="train"))
