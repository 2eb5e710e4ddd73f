"""find_hf_model picks the outermost Hugging Face model; text_decoder_layers_path finds the text decoder."""

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import tiny_models as tm
from lightning_automodel.core.discovery import find_hf_model, text_decoder_layers_path


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def test_root_itself_and_plain_attribute():
    llm = tm.tiny_llama()
    assert find_hf_model(llm) == ("", llm)
    assert find_hf_model(Holder(model=llm)) == ("model.", llm)


def test_no_hf_model_returns_root():
    root = Holder(net=nn.Linear(2, 2))
    assert find_hf_model(root) == ("", root)


def test_shallow_model_wins_over_a_deeper_one_registered_first():
    student, teacher = tm.tiny_llama(), tm.tiny_llama(seed=1)
    root = Holder(helper=Holder(teacher=teacher), model=student)
    # A depth-first walk meets the teacher first; the outermost model is the student.
    first_depth_first = next(m for n, m in root.named_modules() if n and m.__class__ is teacher.__class__)
    assert first_depth_first is teacher
    assert find_hf_model(root) == ("model.", student)


def test_a_vlm_is_chosen_over_its_nested_vision_model():
    vlm = tm.tiny_llava()
    from transformers import PreTrainedModel

    assert isinstance(vlm.model.vision_tower, PreTrainedModel)  # nested HF models exist
    assert find_hf_model(Holder(model=vlm)) == ("model.", vlm)


def test_wrapper_components_are_stripped_from_the_prefix():
    llm = tm.tiny_llama()
    compiled = Holder(_orig_mod=llm)
    assert find_hf_model(Holder(model=compiled)) == ("model.", llm)
    assert find_hf_model(compiled) == ("", llm)


def test_text_decoder_layers_path_for_text_and_vlm_models():
    assert text_decoder_layers_path(tm.tiny_llama()) == "model.layers"
    vlm = tm.tiny_llava()
    path = text_decoder_layers_path(vlm, vlm.config.text_config.num_hidden_layers)
    assert path == "model.language_model.layers"
    assert text_decoder_layers_path(tm.tiny_llama(), num_layers=99) is None


class _NoDecoderVLM(nn.Module):
    """No get_decoder(): the fallback search must skip the vision tower's layer list (registered first)."""

    def __init__(self):
        super().__init__()
        self.visual = Holder(blocks=Holder(layers=nn.ModuleList(nn.Linear(2, 2) for _ in range(3))))
        self.llm = Holder(layers=nn.ModuleList(nn.Linear(2, 2) for _ in range(3)))


def test_fallback_search_skips_vision_towers():
    model = _NoDecoderVLM()
    assert text_decoder_layers_path(model, 3) == "llm.layers"


def test_checkpoint_wrapped_decoder_path_is_canonical():
    model = tm.tiny_llama()
    model.model = checkpoint_wrapper(model.model)
    assert text_decoder_layers_path(model) == "model.layers"
