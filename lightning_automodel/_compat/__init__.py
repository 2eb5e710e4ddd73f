"""The package's only door to private names of torch, Lightning, transformers and peft (issue 20); each wrapper
says why no public API serves. ``tests/test_compat.py`` fails loudly when a release changes one.
Checked on torch 2.13.0, lightning 2.6.6, transformers 5.25.0, peft 0.21.2 (jsonargparse 4.53.0)."""
