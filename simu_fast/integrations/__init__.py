"""Integrations with other tools: the transformers Trainer (simu_fast.integrations.transformers)."""
