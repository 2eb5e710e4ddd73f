"""Every private library name behind ``lightning_automodel/_compat`` still does what the package relies on.

Each test runs the wrapper against the installed torch / Lightning / transformers / peft and fails with a
message naming the library and the API when a release changes it (the attribute vanishes, the
signature or the recorded text changes): the break shows up here, not in a user's run.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from typing import Optional

import pytest
import torch
from torch import nn

from lightning_automodel._compat import lightning as compat_lightning
from lightning_automodel._compat import peft as compat_peft
from lightning_automodel._compat import torch as compat_torch
from lightning_automodel._compat import transformers as compat_transformers
from tests.tiny_models import tiny_llama


def _changed(library: str, api: str, what: str) -> str:
    return f"{library} changed {api}: {what}; update lightning_automodel/_compat and its docstring."


# ---- torch -------------------------------------------------------------------------------------


def test_dcp_metadata_private_globals_exist_and_cover_a_real_save(tmp_path):
    import torch.distributed.checkpoint as dcp

    for module_name, names in compat_torch.DCP_METADATA_PRIVATE_GLOBALS.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name), _changed("torch", f"{module_name}.{name}", "no longer exists (DCP metadata allow-list)")
    dcp.save({"w": torch.ones(2, 3), "step": torch.tensor(1)}, checkpoint_id=str(tmp_path), no_dist=True)
    globals_used: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):  # our own file: recording what it references is safe
        def find_class(self, module: str, name: str):
            globals_used.add((module, name))
            return super().find_class(module, name)

    with open(tmp_path / ".metadata", "rb") as file:
        Recording(file).load()
    private = {(m, n) for m, n in globals_used if n.startswith("_")}
    allowed = {(m, n) for m, names in compat_torch.DCP_METADATA_PRIVATE_GLOBALS.items() for n in names}
    assert private <= allowed, _changed("torch", "DCP .metadata pickling", f"it now references private globals {sorted(private - allowed)}")
    from lightning_automodel.core.training_checkpoint_reader import SafeFileSystemReader

    assert "w" in SafeFileSystemReader(tmp_path).read_metadata().state_dict_metadata


def test_apply_to_tensors_swaps_chosen_tensors_and_keeps_parameter_objects():
    layer = nn.Linear(2, 2)
    layer.weight.grad = torch.ones(2, 2)
    weight = layer.weight
    compat_torch.apply_to_tensors(layer, lambda t: t.to(torch.bfloat16) if t.dim() == 2 else t)
    assert layer.weight is weight, _changed("torch", "nn.Module._apply", "it no longer keeps Parameter objects")
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16, _changed("torch", "nn.Module._apply", "no cast of data and grad")
    assert layer.bias.dtype == torch.float32


def test_own_slots_keep_none_entries_and_duplicate_children():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("transient", torch.zeros(1), persistent=False)
            self.register_buffer("kept", torch.zeros(1))
            self.register_buffer("empty", None)
            self.a = nn.Linear(1, 1, bias=False)
            self.b = self.a

    module = Two()
    assert compat_torch.own_parameters(module.a) == {"weight": module.a.weight, "bias": None}, _changed("torch", "Module._parameters", "bias=None slot missing")
    assert set(compat_torch.own_buffers(module)) == {"transient", "kept", "empty"}, _changed("torch", "Module._buffers", "slots differ")
    assert list(compat_torch.own_children(module)) == ["a", "b"], _changed("torch", "Module._modules", "a child under two names is missing")
    assert compat_torch.non_persistent_buffer_names(module) == {"transient"}, _changed("torch", "Module._non_persistent_buffers_set", "wrong names")
    assert set(module.state_dict()) == {"kept", "a.weight", "b.weight"}


def test_set_own_slots_gives_a_shallow_copy_its_own_dicts():
    original = nn.Linear(2, 2)
    twin = object.__new__(nn.Linear)
    twin.__dict__.update(original.__dict__)
    compat_torch.set_own_slots(twin, parameters={"weight": nn.Parameter(torch.zeros(2, 2)), "bias": None}, buffers={}, children={})
    assert twin.bias is None and torch.equal(twin.weight, torch.zeros(2, 2)), _changed("torch", "Module attribute lookup", "slots not read")
    assert original.bias is not None and not torch.equal(original.weight, torch.zeros(2, 2)), "the original module changed"
    assert twin(torch.ones(1, 2)).abs().sum() == 0


def test_patched_registration_sees_every_parameter_and_buffer_and_restores():
    original = (nn.Module.register_parameter, nn.Module.register_buffer)
    seen = []

    def to_meta(module, name, tensor):
        seen.append(name)
        return tensor.to("meta") if not isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.to("meta"))

    with compat_torch.patched_registration(to_meta, to_meta):
        layer, norm = nn.Linear(3, 4), nn.BatchNorm1d(3)
    assert layer.weight.is_meta and layer.bias.is_meta, _changed("torch", "nn.Linear construction", "does not go through register_parameter")
    assert norm.running_mean.is_meta, _changed("torch", "BatchNorm construction", "does not go through register_buffer")
    assert {"weight", "bias", "running_mean"} <= set(seen)
    assert (nn.Module.register_parameter, nn.Module.register_buffer) == original
    assert not nn.Linear(1, 1).weight.is_meta


def test_op_schema_describes_aten_ops():
    schema = compat_torch.op_schema(torch.ops.aten.normal_.default)
    assert schema.name == "aten::normal_" and schema.is_mutable, _changed("torch", "OpOverload._schema", f"got {schema}")
    assert any(argument.name == "generator" for argument in schema.arguments), _changed("torch", "OpOverload._schema.arguments", "no generator argument")
    assert schema.returns[0].alias_info is not None
    assert not compat_torch.op_schema(torch.ops.aten.add.Tensor).is_mutable


def test_torch_dispatch_mode_sees_the_aten_ops_of_an_init():
    mode_class = compat_torch.torch_dispatch_mode()
    ops = []

    class Record(mode_class):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(compat_torch.op_schema(func).name)
            return func(*args, **(kwargs or {}))

    weight = torch.empty(2, 2)
    with Record():
        nn.init.normal_(weight)
    assert "aten::normal_" in ops, _changed("torch", "torch.utils._python_dispatch.TorchDispatchMode", f"recorded {ops}")


def test_local_shape_and_offset_of_a_dtensor_and_the_world_group_device():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    parameters = list(inspect.signature(compute_local_shape_and_global_offset).parameters)
    assert parameters[:3] == ["global_shape", "mesh", "placements"], _changed(
        "torch", "torch.distributed.tensor._utils.compute_local_shape_and_global_offset", f"parameters are {parameters}"
    )
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        tensor = distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
        assert compat_torch.local_shape_and_offset(tensor) == ((4, 3), (0, 0))
        assert hasattr(dist.group.WORLD, "bound_device_id"), _changed("torch", "ProcessGroup.bound_device_id", "gone (core/distributed.py)")
    finally:
        if started:
            dist.destroy_process_group()


def test_checkpoint_wrapper_keeps_the_wrapped_module_under_the_known_name():
    from lightning_automodel.core.naming import WRAPPER_COMPONENTS

    layer = nn.Linear(2, 2)
    wrapped = compat_torch.checkpoint_wrapper()(layer)
    names = [name for name, _ in wrapped.named_children()]
    assert names and names[0] in WRAPPER_COMPONENTS, _changed("torch", "checkpoint_wrapper", f"children are {names}")
    x = torch.ones(1, 2)
    assert torch.equal(wrapped(x), layer(x))


# ---- transformers ------------------------------------------------------------------------------


def test_hf_initialized_flag_is_the_name_transformers_reads():
    import transformers.modeling_utils as modeling_utils

    assert compat_transformers.HF_INITIALIZED_FLAG in inspect.getsource(modeling_utils), _changed(
        "transformers", "param._is_hf_initialized", "modeling_utils no longer reads it"
    )


def test_declared_tied_weights_of_a_causal_lm():
    from transformers import LlamaForCausalLM

    declared = compat_transformers.declared_tied_weights(LlamaForCausalLM)
    assert declared == {"lm_head.weight": "model.embed_tokens.weight"}, _changed("transformers", "PreTrainedModel._tied_weights_keys", f"got {declared!r}")
    assert compat_transformers.declared_tied_weights(nn.Linear(1, 1)) is None


def test_init_weights_hook_initializes_one_module():
    model = tiny_llama()
    hook = compat_transformers.init_weights_hook(model)
    assert callable(hook), _changed("transformers", "PreTrainedModel._init_weights", "not a method")
    assert list(inspect.signature(hook).parameters) == ["module"], _changed("transformers", "PreTrainedModel._init_weights", "signature changed")
    layer = nn.Linear(8, 8)
    nn.init.zeros_(layer.weight)
    hook(layer)
    assert layer.weight.abs().sum() > 0, _changed("transformers", "PreTrainedModel._init_weights", "left a Linear's weight untouched")
    assert compat_transformers.init_weights_hook(nn.Linear(1, 1)) is None


def test_init_weights_flag_off_restores_exactly():
    module = compat_transformers._init_module()
    before = dict(module.__dict__)
    with pytest.raises(ValueError), compat_transformers.init_weights_flag_off():
        assert module._init_weights is False
        raise ValueError
    assert ("_init_weights" in module.__dict__) == ("_init_weights" in before)
    assert module.__dict__.get("_init_weights") == before.get("_init_weights")


def test_weight_conversions_attribute_is_what_revert_reads():
    from transformers.core_model_loading import revert_weight_conversion

    assert "_weight_conversions" in inspect.getsource(revert_weight_conversion), _changed(
        "transformers", "revert_weight_conversion", "no longer reads model._weight_conversions"
    )
    model = tiny_llama()
    assert compat_transformers.loaded_weight_conversions(model) is None
    with compat_transformers.weight_conversions_set(model, []):
        assert compat_transformers.loaded_weight_conversions(model) == []
        reverted = revert_weight_conversion(model, {"model.norm.weight": torch.ones(2)})
        assert set(reverted) == {"model.norm.weight"}
    assert "_weight_conversions" not in model.__dict__


# ---- Lightning ---------------------------------------------------------------------------------


def test_union_member_error_finds_the_class_error_in_jsonargparse_text():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--layer", type=Optional[nn.Module])
    with pytest.raises(Exception) as raised:
        parser.parse_args(["--layer", '{"class_path": "torch.nn.Linear", "init_args": {"in_features": "big", "out_features": 1}}'])
    line = " ".join(str(raised.value).split())
    found = compat_lightning.union_member_error(line)
    assert found is not None, _changed("jsonargparse", "the Union error text", line)
    assert "in_features" in found and "NoneType" not in found
    assert compat_lightning.union_member_error("Parser key \"x\": something else") is None



def test_import_path_policy_is_put_back():
    from jsonargparse import ArgumentParser, set_parsing_settings

    def parses_linear() -> bool:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--layer", type=nn.Module)
        try:
            parser.parse_args(["--layer", '{"class_path": "torch.nn.Identity"}'])
        except Exception:  # noqa: BLE001 - refused by the policy
            return False
        return True

    assert parses_linear()
    with compat_lightning.import_path_policy_preserved():
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=["lightning_automodel"])
        assert not parses_linear(), _changed("jsonargparse", "set_parsing_settings(import_path_denylist=...)", "no longer refuses")
    assert parses_linear(), _changed("jsonargparse", "parsing_settings['import_path_verdicts']", "restoring it does not restore the policy")

def test_set_process_group_backend_is_what_the_strategy_uses():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()
    assert "_process_group_backend" in vars(strategy), _changed("lightning", "ModelParallelStrategy._process_group_backend", "not set by __init__")
    compat_lightning.set_process_group_backend(strategy, "gloo")
    assert strategy.process_group_backend == "gloo", _changed("lightning", "ModelParallelStrategy.process_group_backend", "does not read it")
    assert "_process_group_backend" in inspect.getsource(ModelParallelStrategy._setup_distributed)


def test_lightning_cli_runs_the_ckpt_path_step_the_hooks_replace():
    from lightning.pytorch.cli import LightningCLI

    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None)), _changed("lightning", "LightningCLI._parse_ckpt_path", "gone")
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), _changed(
        "lightning", "LightningCLI.__init__", "no longer calls _parse_ckpt_path after parsing"
    )
    calls = []

    class Hooked(compat_lightning.LightningCLIHooks):
        def check_ckpt_path_config(self) -> None:
            calls.append(True)

    Hooked()._parse_ckpt_path()
    assert calls == [True]


def test_callback_state_key_matches_lightning_format():
    from lightning.pytorch import Callback

    class Tagged(Callback):
        pass

    callback = Tagged()
    ours = compat_lightning.callback_state_key(callback, strict=True, size=3)
    assert ours == callback._generate_state_key(strict=True, size=3), _changed(
        "lightning", "Callback._generate_state_key", "its key text differs: saved callback state would not be found"
    )


def test_strategy_optimizers_setter_rewraps_and_restores():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    strategy.optimizers = [optimizer]
    saved = strategy.optimizers
    strategy.optimizers = []
    assert strategy.optimizers == [] and strategy._lightning_optimizers == []
    strategy.optimizers = saved
    assert strategy.optimizers == [optimizer] and strategy._lightning_optimizers[0].optimizer is optimizer, _changed(
        "lightning", "Strategy.optimizers setter", "it no longer wraps the optimizers (AtomicModelParallelStrategy hides them with it)"
    )



def test_conversion_protocol_names_and_attributes():
    from lightning_automodel._compat.transformers import _CONVERSION_PROTOCOL

    for name, module in _CONVERSION_PROTOCOL.items():
        assert hasattr(importlib.import_module(module), name), _changed("transformers", f"{module}.{name}", "gone")
    WeightConverter = compat_transformers.WeightConverter  # noqa: N806
    parameters = set(inspect.signature(WeightConverter).parameters)
    assert {"source_patterns", "target_patterns", "operations"} <= parameters, _changed("transformers", "WeightConverter", f"parameters {parameters}")
    assert callable(getattr(WeightConverter, "reverse_transform", None)), _changed("transformers", "WeightConverter.reverse_transform", "gone")
    assert "dim" in inspect.signature(compat_transformers.MergeModulelist).parameters, _changed("transformers", "MergeModulelist", "no dim")
    model = tiny_llama()
    rules = compat_transformers.get_model_conversion_mapping(model, add_legacy=False)
    assert isinstance(rules, list), _changed("transformers", "get_model_conversion_mapping", f"returned {type(rules)}")
    renamed, pattern = compat_transformers.apply_converters("model.layers.0.mlp.up_proj.weight", [])
    assert (renamed, pattern) == ("model.layers.0.mlp.up_proj.weight", None), _changed("transformers", "apply_converters", f"got {(renamed, pattern)}")
    assert sorted(["a.10", "a.2"], key=compat_transformers.dot_natural_key) == ["a.2", "a.10"]
    with pytest.raises(AttributeError):
        compat_transformers.no_such_name  # noqa: B018


# ---- peft --------------------------------------------------------------------------------------


def _adapted_llama(**lora: object) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_llama()
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj"], **lora), model, adapter_name="default")
    return model.model.layers[0].self_attn.q_proj


def test_peft_layer_settings_are_the_config_it_was_injected_with():
    layer = _adapted_llama(r=4, lora_alpha=16, use_rslora=True)
    settings = compat_peft.layer_settings(layer, "default")
    assert settings == {"r": 4, "lora_alpha": 16, "use_rslora": True, "use_dora": False, "lora_bias": False, "fan_in_fan_out": False}, _changed(
        "peft", "LoraLayer per-adapter dicts (r, lora_alpha, use_rslora, use_dora, lora_bias)", f"read {settings}"
    )
    assert compat_peft.layer_variant(layer, "default") is None
    dora = _adapted_llama(r=2, use_dora=True)
    assert type(compat_peft.layer_variant(dora, "default")).__name__ == "DoraLinearVariant", _changed("peft", "LoraLayer.lora_variant", "no DoRA variant recorded")


def test_peft_create_adapter_runs_peft_init_on_a_layer():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    parameters = list(inspect.signature(LoraLayer.update_layer).parameters)
    assert parameters[:5] == ["self", "adapter_name", "r", "lora_alpha", "config"], _changed("peft", "LoraLayer.update_layer", f"parameters {parameters}")
    layer = _adapted_llama(r=4)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=True)
    compat_peft.create_adapter(layer, "other", config)
    a, b = layer.lora_A["other"].weight, layer.lora_B["other"].weight
    assert a.shape[0] == 2 and b.shape[1] == 2 and a.abs().sum() > 0 and b.abs().sum() == 0, _changed("peft", "LoraLayer.update_layer", "adapter not built as configured")
