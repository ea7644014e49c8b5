"""Controllers of a loss coefficient from the measured token entropy, one update per optimiser step.

`StepEntropyMeter` measures the token-weighted mean entropy of pi_theta over the valid tokens of
the optimiser step (every micro-batch, every process; the entropies of the loss's own forward
pass, so no extra pass):  H_k = sum_{step's tokens} entropy / (number of those tokens).

`EntropyCoefController` is the shared machinery: a TrainerCallback that, at the end of step k,
logs the coefficient the step's loss used, updates its state from H_k, and writes the coefficient
for step k+1 with `trainer.set_loss_hparam`; its state travels in checkpoints (trainer_state.json's
stateful_callbacks). `AdaptiveEntropyCoef` (below) is Skywork-OR1's controller of the entropy
bonus, TRL's `use_adaptive_entropy`; `tepo.training.adaptive_tepo` controls TEPO's KL mask.
Formulas, defaults and the differences from TRL: docs/controls.md.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class StepEntropyMeter:
    """Token-weight piece that weighs nothing (returns None) and sums the entropy of the step's
    valid tokens in training; `take(trainer)` reduces the sums over processes, returns H and resets."""

    def __init__(self):
        self._sum = 0.0
        self._count = 0.0
        self._device = None

    def __call__(self, trainer, inputs, *, logp, entropy, mask):
        if trainer.model.training:
            m = mask.to(torch.float64)
            self._sum += float((entropy.to(torch.float64) * m).sum())
            self._count += float(m.sum())
        return None, {}

    def take(self, trainer) -> float:
        """H of the step just ended (NaN when it had no valid token); collective over processes."""
        totals = torch.tensor([self._sum, self._count], dtype=torch.float64, device=trainer.accelerator.device)
        if trainer.accelerator.num_processes > 1:
            totals = trainer.accelerator.reduce(totals, reduction="sum")
        self._sum, self._count = 0.0, 0.0
        s, n = totals.tolist()
        return s / n if n > 0 else float("nan")


def skywork_update(coef: float, entropy: float, *, target: float, delta: float, low: float, high: float) -> float:
    """Skywork-OR1 / TRL: c + delta if H <= target else c - delta, clipped to [low, high]."""
    if entropy <= target:
        return min(coef + delta, high)
    return max(coef - delta, low)


def skywork_applied(coef: float, last_entropy: float, target: float) -> float:
    """The bonus coefficient a step uses: c while the last measured H <= target, else 0 (TRL's gate)."""
    return coef if last_entropy <= target else 0.0


class EntropyCoefController(TrainerCallback, ExportableState):
    """Base: sets the loss hyper-parameter `hparam` (`trainer.set_loss_hparam`) once per optimiser step from the step's entropy.

    Subclasses define `update(entropy) -> None` (the state change after a step) and `applied() ->
    float` (the coefficient the next step's loss uses); `state_keys` lists the attributes saved in
    checkpoints. The coefficient a step used is logged under `hparam` at the end of that step.
    """

    hparam: str = ""
    state_keys: tuple[str, ...] = ()

    def __init__(self, trainer):
        self.trainer = trainer
        self.meter = StepEntropyMeter()
        self._restored = False
        trainer.token_weights.append(self.meter)
        trainer.set_loss_hparam(self.hparam, self.applied())

    # subclass interface
    def update(self, entropy: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def applied(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        return {}

    # TrainerCallback
    def on_step_begin(self, args, state, control, **kwargs):
        if not self._restored:  # after a resume, trainer_state.json holds the saved state
            self._restored = True
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(saved, dict) and saved.get("attributes"):
                for key in self.state_keys:
                    if key in saved["attributes"]:
                        setattr(self, key, float(saved["attributes"][key]))
                self.trainer.set_loss_hparam(self.hparam, self.applied())

    def on_step_end(self, args, state, control, **kwargs):
        used = float(self.trainer.loss_hparam(self.hparam))
        entropy = self.meter.take(self.trainer)
        if math.isfinite(entropy):  # a step without valid tokens (or a non-finite one) changes nothing
            self.update(entropy)
        self.trainer.set_loss_hparam(self.hparam, self.applied())
        self.trainer.record_metric(self.hparam, used)
        for name, value in self.extra_metrics().items():
            self.trainer.record_metric(name, value)

    # ExportableState
    def state(self) -> dict:
        return {"args": {}, "attributes": {key: getattr(self, key) for key in self.state_keys}}


class AdaptiveEntropyCoef(EntropyCoefController):
    """Skywork-OR1's adaptive entropy bonus (TRL's `use_adaptive_entropy`), for any objective.

    State c (starts at entropy_coef) and H_last (starts at +inf). After step k:
        c <- clip(c + delta if H_k <= target else c - delta, [entropy_coef_min, entropy_coef_max]),
        H_last <- H_k;
    step k+1's loss uses entropy_coef = c if H_last <= target else 0 (so the first step has no bonus).
    """

    hparam = "entropy_coef"
    state_keys = ("coef", "last_entropy")

    def __init__(self, trainer, *, initial: float, target: float, delta: float, low: float, high: float):
        self.coef, self.last_entropy = float(initial), math.inf
        self.target, self.delta, self.low, self.high = float(target), float(delta), float(low), float(high)
        super().__init__(trainer)

    def update(self, entropy: float) -> None:
        self.coef = skywork_update(self.coef, entropy, target=self.target, delta=self.delta, low=self.low, high=self.high)
        self.last_entropy = entropy

    def applied(self) -> float:
        return skywork_applied(self.coef, self.last_entropy, self.target)
