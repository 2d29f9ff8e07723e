"""deepred: give a language model a persona by LoRA fine-tuning and ship it to local-model apps (README, "Layout")."""
