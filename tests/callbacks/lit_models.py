"""Small LightningModules around tiny Hugging Face models, for callback tests and 2-rank scripts."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import tiny_models as tm


class RandomTokens(Dataset):
    def __init__(self, n: int = 64, seq: int = 16, vocab: int = tm.VOCAB, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def loader(n: int = 64, batch_size: int = 4, seq: int = 16) -> DataLoader:
    return DataLoader(RandomTokens(n, seq), batch_size=batch_size, shuffle=False)


class InitLM(pl.LightningModule):
    """The HF model exists after ``__init__`` (no ``configure_model``)."""

    def __init__(self, builder: Callable[[], torch.nn.Module] = tm.tiny_llama, lr: float = 1e-2, all_params_in_optimizer: bool = False):
        super().__init__()
        self.model = builder()
        self.lr = lr
        self.all_params_in_optimizer = all_params_in_optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        params = self.parameters() if self.all_params_in_optimizer else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)


class ShardedLM(InitLM):
    """Builds the model in ``configure_model`` and shards it with FSDP2 when a device mesh exists."""

    def __init__(self, builder: Callable[[], torch.nn.Module] = tm.tiny_llama, lr: float = 1e-2, build_in_configure: bool = True):
        pl.LightningModule.__init__(self)
        self.builder = builder
        self.lr = lr
        self.all_params_in_optimizer = False
        self.losses = []
        self.model = None if build_in_configure else builder()
        self.configure_calls = 0

    def configure_model(self):
        self.configure_calls += 1
        if self.model is None:
            self.model = self.builder()
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard([self.model.get_input_embeddings(), self.model.get_output_embeddings()], mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
