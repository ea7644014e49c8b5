"""Stock TRL `GRPOTrainer` on a `tepo train` command line: the same problems, model, batch shape,
seed and held-out evaluation, with TRL's own loss for the objective (`tepo.training.stock`).

The learning-curve counterpart of tests/test_stock_parity.py: does `tepo train --objective dapo`
learn as fast as stock TRL's dapo on the same problems? Takes the arguments of `tepo train`
(`--config`, any TEPOConfig field) and writes OUTPUT_DIR/stock_summary.json (held-out before and
after, the per-step log) and eval_before.json / eval_after.json, as `tepo train` does. Heavy: one
run of the README's recipe takes as long as `tepo train` (run it alone on the 2-core box):

    .venv/bin/python bench/stock_trl.py --config recipes/quickstart.yaml --objective dapo \\
        --temperature 1.0 --max_steps 40 --output_dir runs/stock-dapo
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def rollout_means(log: list[dict], key: str, n: int = 5) -> tuple[float | None, float | None]:
    """Mean of `key` over the first and the last n steps that logged it (TRL logs the reward once per
    rollout, at the step that generated it)."""
    values = [row[key] for row in log if row.get(key) is not None]
    if not values:
        return None, None
    return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def main(argv: list[str] | None = None) -> int:
    from tepo.models import resolve_model
    from tepo.rewards import math_reward_func
    from tepo.tasks import to_prompt_dataset
    from tepo.training.cli import heldout_eval, load_problems, parse
    from tepo.training.stock import stock_trl_config, stock_trl_trainer_class

    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    try:
        script, tepo_config = parse(argv)
        config = stock_trl_config(tepo_config)
        train_problems, heldout = load_problems(script)
    except (ValueError, FileNotFoundError) as err:
        print(f"stock_trl: error: {err}", file=sys.stderr)
        return 2
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(script.model)
    print(f"stock_trl: {stock_trl_trainer_class(tepo_config.objective).__name__} loss_type={config.loss_type} importance_sampling_level="
          f"{config.importance_sampling_level} epsilon={config.epsilon}/{config.epsilon_high} on "
          f"{len(train_problems)} problems, model {model_path}, {config.max_steps} steps -> {out}", flush=True)
    trainer_class = stock_trl_trainer_class(tepo_config.objective)  # GMPOTrainer for gmpo
    trainer = trainer_class(model=model_path, reward_funcs=math_reward_func, args=config,
                          train_dataset=to_prompt_dataset(train_problems))
    max_new = tepo_config.heldout_max_new_tokens or config.max_completion_length
    evals = {}
    if heldout:
        evals["before"] = heldout_eval(trainer, heldout, max_new_tokens=max_new,
                                       batch_size=script.heldout_batch_size, step=0)
        print(f"stock_trl: held-out accuracy before: {evals['before']['accuracy']:.1%}", flush=True)
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    if heldout:
        evals["after"] = heldout_eval(trainer, heldout, max_new_tokens=max_new, batch_size=script.heldout_batch_size,
                                      step=int(trainer.state.global_step))
    log = [row for row in trainer.state.log_history if "loss" in row]
    reward = rollout_means(log, "reward")
    entropy = rollout_means(log, "entropy")
    summary = {
        "command": "bench/stock_trl.py " + " ".join(argv),
        "trainer": f"trl.GRPOTrainer (loss_type={config.loss_type}, importance_sampling_level="
                   f"{config.importance_sampling_level}, epsilon={config.epsilon}, epsilon_high={config.epsilon_high})",
        "steps": int(trainer.state.global_step),
        "train_seconds": round(train_seconds, 1),
        "reward_first5_last5": reward,
        "entropy_first5_last5": entropy,
        **{f"heldout_{name}": {k: v for k, v in result.items() if k not in ("ids", "verdicts", "answers")}
           for name, result in evals.items()},
        "log": log,
    }
    (out / "stock_summary.json").write_text(json.dumps(summary, indent=1))
    for name, result in evals.items():
        (out / f"eval_{name}.json").write_text(json.dumps(result, indent=1))
    lines = ["", f"stock_trl: done ({summary['trainer']})",
             f"  steps              {summary['steps']}",
             f"  time               training {train_seconds:.0f} s, total {time.perf_counter() - started:.0f} s"]
    if reward[0] is not None:
        lines.append(f"  sampled reward     {reward[0]:.3f} (first 5 rollouts) -> {reward[1]:.3f} (last 5)")
    if entropy[0] is not None:
        lines.append(f"  token entropy      {entropy[0]:.2f} (first 5 steps) -> {entropy[1]:.2f} (last 5)")
    if "after" in evals:
        lines.append(f"  held-out accuracy  {evals['before']['accuracy']:.1%} -> {evals['after']['accuracy']:.1%} "
                     f"(greedy, {evals['after']['num_problems']} problems, {max_new} new tokens)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
