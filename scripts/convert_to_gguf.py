#!/usr/bin/env python3
"""Convert a merged model to GGUF for LM Studio / llama.cpp (same code as `deepred convert`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deepred.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(only="convert"))
