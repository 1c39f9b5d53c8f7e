"""Adaptation: fine-tuning (full and LoRA), SFT on chat data, merging adapters."""
