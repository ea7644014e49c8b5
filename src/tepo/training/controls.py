"""Objective-independent controls a `TEPOConfig` switches on, installed on a `TEPOTrainer`.

- `top_entropy_quantile < 1`:   `token_selection.HighEntropyTokenSelection` (a token-weight piece)
- `off_policy_mask_threshold`:  `off_policy_mask.OffPolicySequenceMask` (a token-weight piece)
- `use_adaptive_entropy`:       `entropy_control.AdaptiveEntropyCoef` (sets entropy_coef per step)
- `adaptive_tepo`:              `adaptive_tepo.AdaptiveTEPOKLCoef` (sets tepo_kl_coef per step)
The soft overlong punishment is a reward function (`overlong`), added by `tepo train`.
Specification: docs/controls.md.
"""

from __future__ import annotations


def install_controls(trainer, args) -> None:
    """Append the pieces to `trainer.token_weights` and add the controllers as callbacks."""
    if args.off_policy_mask_threshold is not None:
        from tepo.training.off_policy_mask import OffPolicySequenceMask

        trainer.token_weights.append(OffPolicySequenceMask(args.off_policy_mask_threshold))
    if args.top_entropy_quantile < 1.0:
        from tepo.training.token_selection import HighEntropyTokenSelection

        trainer.token_weights.append(HighEntropyTokenSelection(args.top_entropy_quantile))
    hp = args.resolved_hparams()
    if args.use_adaptive_entropy:
        from tepo.training.entropy_control import AdaptiveEntropyCoef

        trainer.add_callback(AdaptiveEntropyCoef(
            trainer, initial=hp["entropy_coef"], target=args.entropy_target, delta=args.entropy_coef_delta,
            low=args.entropy_coef_min, high=args.entropy_coef_max,
        ))
    if args.adaptive_tepo:
        from tepo.training.adaptive_tepo import AdaptiveTEPOKLCoef

        trainer.add_callback(AdaptiveTEPOKLCoef(
            trainer, initial=hp["tepo_kl_coef"], target=args.adaptive_tepo_target,
            target_ratio=args.adaptive_tepo_target_ratio, rate=args.adaptive_tepo_rate,
            high=args.adaptive_tepo_kl_max,
        ))
