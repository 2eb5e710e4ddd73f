"""LightningModules for Hugging Face models."""

from lightning_automodel.models.hf_causal_lm import HFCausalLM

__all__ = ["HFCausalLM"]
