"""EMA of the weights (Lightning's WeightAveraging) with timm's warm-up, made safe for fake-quant networks."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor


class WarmupEMA:
    """EMA update with timm's warm-up: the decay grows as (1 + n) / (10 + n) up to `decay`, so the average is not
    dominated by the random initialisation for the first ~1/(1 - decay) steps (Lightning's EMA has no warm-up)."""

    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        if not averaged.is_floating_point():
            return current  # counters, zero points, observer switches: the current model's, never a blend
        decay = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=self.decay) if self.warmup else self.decay
        return averaged + (current - averaged) * (1 - decay)


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging (parameters and buffers) with two corrections for fake-quant networks:
    - per-channel observers size their range buffers on the first forward, after the average was copied, so an
      averaged tensor whose shape the model has since changed takes the model's tensor before the update;
    - the swap that puts the averaged tensors in for validation also swaps in the observers' on/off switches the
      average copied while training, so the network is switched to eval again after it (observers stay off
      whenever it evaluates);
    - on resume, the averaged copy's `load_state_dict` left the fake-quant modules' `eps` buffers at their default
      (1.2e-7 instead of the checkpoint's 2^-12), so every averaged tensor is also copied by name from the
      checkpoint."""

    _shapes_checked = False

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None or "averaging_state" not in checkpoint:
            return
        state = checkpoint["state_dict"]
        module = self._average_model.module
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if name in state and state[name].shape == tensor.shape:
                    tensor.copy_(state[name])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._average_model is not None and not self._shapes_checked:
            # Once: after the first forward every buffer has its final shape (not on the hot path after that).
            averaged = self._average_model.module
            for mine, theirs in zip(averaged.buffers(), pl_module.buffers()):
                if mine.shape != theirs.shape:
                    mine.data = theirs.detach().clone().to(mine.device)
            self._shapes_checked = True
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        pl_module.eval()
