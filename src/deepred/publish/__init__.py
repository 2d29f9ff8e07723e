"""Publishing a finished model: to LM Studio (lmstudio.py) or Ollama (ollama.py) through deploy.py's dispatch, with
what both need in common.py, and the Hugging Face model cards beside every model (cards.py)."""
