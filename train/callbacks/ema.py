"""EMA of the weights (Lightning's WeightAveraging) with timm's warm-up, one fused update a step, made safe for
fake-quant networks."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class FusedEMA(AveragedModel):
    """The averaged copy, updated in one fused step: a foreach `lerp` over every floating-point parameter and buffer,
    a foreach `copy` over the others (counters, zero points, observer switches: the current model's, never a blend).

    The decay is timm's warm-up, (1 + n) / (10 + n) capped at `decay`, so the average is not dominated by the random
    initialisation for the first ~1 / (1 - decay) steps. torch's own path (`AveragedModel` with an `avg_fn`) runs
    ~9 small kernels per tensor and reads `n_averaged` on the host every step; here `n` is also kept on the host
    (`count`, restored from `n_averaged` on resume), so a step issues two foreach kernels and no device sync."""

    def __init__(self, model: nn.Module, *, device: torch.device | None, decay: float, warmup: bool) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.count = 0  # == n_averaged, on the host
        self._cached: tuple[nn.Module, tuple] | None = None

    def decay_at(self, n: int) -> float:
        return min((1 + n) / (10 + n), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine_f, theirs_f, mine_o, theirs_o = self._pairs(model)
        if self.count == 0:
            torch._foreach_copy_([*mine_f, *mine_o], [*theirs_f, *theirs_o])
        else:
            if mine_f:
                torch._foreach_lerp_(mine_f, theirs_f, 1.0 - self.decay_at(self.count))
            if mine_o:
                torch._foreach_copy_(mine_o, theirs_o)
        self.n_averaged += 1
        self.count += 1

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The averaged and the current tensors, floating-point and other, in matching order. Kept from the first
        update while both sides are on one device: the tensors are the same objects every step (optimizers, the
        weight swap for validation and the first-step shape fix all write into them), so a step spends no Python
        time walking the module tree (~0.5 ms for a MobileNet's ~250 tensors, a few % of a small step)."""
        if self._cached is not None and self._cached[0] is model:
            return self._cached[1]
        mine = [*self.module.parameters(), *self.module.buffers()]
        device = mine[0].device if mine else None
        current = [*model.parameters(), *model.buffers()]
        theirs = [t.to(device, non_blocking=True) for t in current]
        floats = [i for i, t in enumerate(mine) if t.is_floating_point()]
        others = [i for i, t in enumerate(mine) if not t.is_floating_point()]
        pairs = ([mine[i] for i in floats], [theirs[i] for i in floats], [mine[i] for i in others],
                 [theirs[i] for i in others])
        if all(a is b for a, b in zip(theirs, current)):  # no copy to another device: the same tensors next step
            self._cached = (model, pairs)
        return pairs

    def sync_count(self) -> None:
        """After `n_averaged` was loaded (resume): the host's count again (one read, at load only)."""
        self.count = int(self.n_averaged)


class EMAWeights(WeightAveraging):
    """Lightning's weight averaging (parameters and buffers) with the fused warm-up EMA (`FusedEMA`) as its averaged
    copy, and corrections for fake-quant networks:
    - per-channel observers size their range buffers on the first forward, after the average was copied, so an
      averaged tensor whose shape the model has since changed takes the model's tensor before the update;
    - the swap that puts the averaged tensors in for validation also swaps in the observers' on/off switches the
      average copied while training, so the network is switched to eval again after it (observers stay off
      whenever it evaluates);
    - on resume, the averaged copy's `load_state_dict` left the fake-quant modules' `eps` buffers at their default
      (1.2e-7 instead of the checkpoint's 2^-12), so every averaged tensor is also copied by name from the
      checkpoint."""

    _shapes_checked = False

    def __init__(self, *, decay: float, warmup: bool) -> None:
        super().__init__(use_buffers=True)
        self.decay, self.warmup = decay, warmup

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # WeightAveraging's setup, with our averaged copy (the module has no configure_model)
            self._average_model = FusedEMA(pl_module, device=self._device or pl_module.device, decay=self.decay,
                                           warmup=self.warmup)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None or "averaging_state" not in checkpoint:
            return
        self._average_model.sync_count()
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
