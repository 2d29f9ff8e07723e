"""Base models: names and the offline built-ins (registry.py), where they are cached (cache.py), how they are built
(tiny.py, smollm2.py), and how any model or tokenizer is loaded (loading.py), for training, merging, export and
evaluation alike."""
