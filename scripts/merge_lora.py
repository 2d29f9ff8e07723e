#!/usr/bin/env python3
"""Merge a LoRA adapter into its base model (same code as `deepred merge`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepred.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(only="merge"))
