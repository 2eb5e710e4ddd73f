"""The package's only door to private names of torch, Lightning, transformers and peft.

Each function or constant here wraps one private attribute, module or protocol that no public API
serves, with a docstring saying why and which versions it was checked on. ``tests/test_compat.py``
exercises every one of them against the installed libraries and fails with a line naming the library
and the API when a release changes it; ``tests/test_no_private_access.py`` fails when a module outside
this package reaches a private name of those libraries.

Checked on torch 2.13.0, lightning 2.6.6, transformers 5.25.0, peft 0.21.2 (jsonargparse 4.53.0).
"""
