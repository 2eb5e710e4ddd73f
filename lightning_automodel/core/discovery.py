"""Find the Hugging Face model that callbacks and tools act on.

A LightningModule usually holds one ``PreTrainedModel`` (``self.model``); names shown to users are
relative to it, so that a YAML selector reads like the Hugging Face checkpoint (``model.layers.0``).
"""

from __future__ import annotations

from torch import nn

from lightning_automodel.core.naming import canonical_name


def _is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def find_hf_model(root: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(prefix, model)``: the outermost ``PreTrainedModel`` in ``root`` and its attribute prefix.

    The prefix is the dotted path of the model inside ``root`` with a trailing dot (``"model."``), or
    ``""`` when ``root`` itself is the model or holds no Hugging Face model (then ``root`` is
    returned). Wrapper components are stripped from the prefix.
    """
    if _is_hf_model(root):
        return "", root
    for name, module in root.named_modules():
        if name and _is_hf_model(module):
            return canonical_name(name) + ".", module
    return "", root
