"""`tepo train`: RL fine-tuning of a language model with any objective.

    tepo train [--config recipes/X.yaml] [--model M] --objective NAME
               (--task arithmetic [--levels 1,2] | --data PATH) --max_steps N --output_dir DIR
               [--resume_from_checkpoint true|PATH] [--heldout_eval false] [...any TEPOConfig/TRL field]

Arguments are TRL's `TrlParser`: a YAML recipe sets defaults, the command line overrides them, and
every `TEPOConfig` / `GRPOConfig` / `TrainingArguments` field is an option under its own name.
Order of work: parse and validate everything, load and validate the data, then load the model.
Outputs in OUTPUT_DIR: metrics.jsonl (one row per optimiser step), eval_before.json and
eval_after.json (greedy held-out accuracy), run.json (the settings), monitor.json, checkpoint-N/,
and the final model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_STOPPED, EXIT_USAGE = 0, 1, 2


@dataclass
class TrainScriptArguments:
    """What to train and on what; everything about how is in TEPOConfig."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model folder or hub id (default: the offline SmolLM2-135M-Instruct)."},
    )
    task: str | None = field(default=None, metadata={"help": "Built-in task: arithmetic (disjoint train/test splits)."})
    data: str | None = field(default=None, metadata={"help": "Training problems: a JSONL file with id, problem, answer."})
    levels: str | None = field(default=None, metadata={"help": "Task difficulty levels, comma-separated (e.g. 1,2)."})
    num_problems: int | None = field(default=None, metadata={"help": "Training problems to use (default: the task's default / the whole file)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the task generator / problem sampling."})
    heldout_eval: bool = field(
        default=True,
        metadata={"help": "Greedy held-out accuracy before and after training (eval_before.json, eval_after.json)."},
    )
    heldout_data: str | None = field(default=None, metadata={"help": "Held-out problems (JSONL); default: the task's test split."})
    heldout_split: str = field(
        default="test",
        metadata={"help": "The task's split the held-out evaluation uses: test, or validation (needs --reserve_validation true)."},
    )
    reserve_validation: bool = field(
        default=False,
        metadata={"help": "Keep the task's training problems off its validation split (a study's runs do; default: "
                          "the training problems of earlier runs)."},
    )
    test_num_problems: int = field(
        default=0,
        metadata={"help": "After training, also greedy-evaluate the first N problems of the task's test split "
                          "(eval_test.json, per-problem verdicts); 0: no."},
    )
    heldout_num_problems: int = field(default=150, metadata={"help": "Held-out problems to evaluate."})
    heldout_batch_size: int = field(default=150, metadata={"help": "Rows per generate batch in held-out evaluation "
                                                                 "(150: the fastest measured on the quickstart, docs/benchmarks.md)."})
    heldout_eval_cache: bool = field(
        default=True,
        metadata={"help": "Reuse the held-out evaluation of the untrained model from an earlier run with the same model "
                          "files, problems, settings, hardware and code ($TEPO_CACHE/baseline-evals; one process only)."},
    )
    soft_overlong_cache: int | None = field(
        default=None,
        metadata={"help": "DAPO's soft overlong punishment (TRL's soft_punish_cache, L_cache): add "
                          "(L_max - L_cache - |y|) / L_cache to the reward of completions longer than L_max - L_cache, "
                          "-1 beyond L_max (docs/controls.md). None: off."},
    )
    soft_overlong_max_len: int | None = field(
        default=None, metadata={"help": "Soft overlong punishment: L_max (TRL's max_completion_len). None: max_completion_length."}
    )


def _levels(text: str | None) -> list[int] | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--levels: expected comma-separated integers such as 1,2, got {text!r}") from None


def _given(argv: list[str], name: str) -> bool:
    """Whether --name was set on the command line or in the --config YAML."""
    flag = f"--{name}"
    if any(a == flag or a.startswith(flag + "=") for a in argv):
        return True
    if "--config" in argv:
        import yaml

        path = argv[argv.index("--config") + 1]
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        return isinstance(config, dict) and config.get(name) is not None
    return False


def _is_main_process() -> bool:
    """Process 0 of a launch (torchrun and accelerate set RANK), or a single process. Only it writes
    the run's files and prints progress: the others would race it on the same paths."""
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _is_main_process():
        print(message, file=sys.stderr)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse(argv: list[str]):
    """(TrainScriptArguments, TEPOConfig), validated; raises ValueError with a message for the user."""
    from trl import TrlParser

    from tepo.training.config import TEPOConfig

    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        if not os.path.isfile(argv[i + 1]):
            raise ValueError(f"--config {argv[i + 1]}: no such file")
    if any(a in ("-h", "--help") for a in argv):
        TrlParser((TrainScriptArguments, TEPOConfig), prog="tepo train").parse_args_and_config(argv)
    if not _given(argv, "use_cpu") and not _cuda_available():
        # transformers refuses bf16 on a machine without a GPU unless use_cpu is set
        _say("tepo train: no GPU found, training on CPU (use_cpu=true)")
        argv = [*argv, "--use_cpu", "true"]
    if not _given(argv, "output_dir"):
        raise ValueError("--output_dir is required (where metrics.jsonl, checkpoints and the model go)")
    parser = TrlParser((TrainScriptArguments, TEPOConfig), prog="tepo train")
    script, config = parser.parse_args_and_config(argv)
    if (script.task is None) == (script.data is None):
        raise ValueError("give exactly one of --task arithmetic or --data PATH")
    if script.heldout_eval and script.task is None and script.heldout_data is None:
        raise ValueError(
            "--heldout_eval needs held-out problems: --data has no test split of its own, so give "
            "--heldout_data PATH, or --heldout_eval false"
        )
    if script.heldout_num_problems < 1 or script.heldout_batch_size < 1:
        raise ValueError("--heldout_num_problems and --heldout_batch_size must be >= 1")
    if script.heldout_split not in ("test", "validation"):
        raise ValueError(f"--heldout_split must be test or validation, got {script.heldout_split!r}")
    if script.heldout_split == "validation" and not script.reserve_validation:
        raise ValueError("--heldout_split validation needs --reserve_validation true (else training draws from the validation problems)")
    if script.test_num_problems < 0 or (script.test_num_problems and script.task is None):
        raise ValueError("--test_num_problems takes N >= 0, and a --task (its test split)")
    if script.soft_overlong_cache is not None:
        overlong_reward(script, config)  # checks the values
    return script, config


def overlong_reward(script: TrainScriptArguments, config):
    """The soft overlong punishment reward function of --soft_overlong_cache / --soft_overlong_max_len."""
    from tepo.training.overlong import SoftOverlongPunishment

    max_len = config.max_completion_length if script.soft_overlong_max_len is None else script.soft_overlong_max_len
    try:
        return SoftOverlongPunishment(max_len=max_len, cache=script.soft_overlong_cache)
    except ValueError as err:
        raise ValueError(f"--soft_overlong_cache / --soft_overlong_max_len: {err}") from None


def load_problems(script: TrainScriptArguments) -> tuple[list[dict], list[dict] | None]:
    """Training problems and held-out problems (None when held-out evaluation is off)."""
    from tepo.tasks import check_disjoint, load_task

    levels = _levels(script.levels)
    kwargs: dict[str, Any] = {"seed": script.task_seed}
    if levels is not None:
        kwargs["levels"] = levels
    if script.num_problems is not None:
        kwargs["num_problems"] = script.num_problems
    train = load_task(task=script.task, data=script.data, split="train", reserve_validation=script.reserve_validation, **kwargs)
    if not train:
        raise ValueError(f"no training problems in {script.data or script.task}")
    heldout = None
    if script.heldout_eval:
        held_kwargs: dict[str, Any] = {"seed": script.task_seed, "num_problems": script.heldout_num_problems}
        if script.heldout_data is not None:
            heldout = load_task(data=script.heldout_data, split="test", **held_kwargs)
        else:
            if levels is not None:
                held_kwargs["levels"] = levels
            heldout = load_task(task=script.task, split=script.heldout_split, **held_kwargs)
        check_disjoint({"training": train, "held-out": heldout})
    return train, heldout


def load_test_problems(script: TrainScriptArguments, train: list[dict], heldout: list[dict] | None) -> list[dict] | None:
    """The test problems of --test_num_problems (None when 0), checked disjoint from the others by content."""
    from tepo.tasks import check_disjoint, load_task

    if not script.test_num_problems:
        return None
    kwargs: dict[str, Any] = {"seed": script.task_seed, "num_problems": script.test_num_problems}
    if _levels(script.levels) is not None:
        kwargs["levels"] = _levels(script.levels)
    test = load_task(task=script.task, split="test", **kwargs)
    others = {"training": train} if heldout is None or script.heldout_split == "test" else {"training": train, "validation": heldout}
    check_disjoint({**others, "test": test})
    return test


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None/false -> None; true -> the newest complete checkpoint of
    output_dir (None, with a note, when there is none yet); a path -> that path (must exist)."""
    from tepo.training.trainer import last_complete_checkpoint

    if value is None or str(value).lower() in ("false", "no", "0", ""):
        return None
    if str(value).lower() in ("true", "yes", "1"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            _say(f"tepo train: no checkpoint in {output_dir} yet; starting from scratch")
        return found
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ValueError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no trainer_state.json)")
    return value


def _checkpoint_step(path: str) -> int:
    return int(json.loads(Path(path, "trainer_state.json").read_text())["global_step"])


def heldout_eval(trainer, problems: list[dict], *, max_new_tokens: int, batch_size: int, step: int) -> dict:
    from tepo.training.callbacks import heldout_greedy_accuracy

    result = heldout_greedy_accuracy(trainer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {"step": step, "max_new_tokens": max_new_tokens, **result}


def evaluate_untrained(trainer, problems: list[dict], *, script: TrainScriptArguments, model_path: str,
                       max_new_tokens: int) -> dict:
    """eval_before.json: the held-out evaluation of the weights before training, reused from
    `tepo.training.baseline_eval_cache` where an identical one was done (one process only)."""
    from tepo.training import baseline_eval_cache as cache

    key = None
    if script.heldout_eval_cache and trainer.accelerator.num_processes == 1:
        key = cache.baseline_eval_key(model_path, problems, max_new_tokens=max_new_tokens,
                                      batch_size=script.heldout_batch_size,
                                      dtype=str(next(trainer.model.parameters()).dtype), bf16=bool(trainer.args.bf16),
                                      device=trainer.accelerator.device, model_config=trainer.model.config.to_dict(),
                                      shared_prefix=trainer.args.shared_prefix)
        cached = cache.load_baseline_eval(key) if key else None
        if cached is not None:
            return {**cached, "step": 0, "cached_from": key}
    # Every process takes part (its share of the problems; under ZeRO-3 gathering the weights is
    # collective); process 0 writes.
    _say(f"tepo train: held-out greedy accuracy before training ({len(problems)} problems)...")
    result = heldout_eval(trainer, problems, max_new_tokens=max_new_tokens, batch_size=script.heldout_batch_size, step=0)
    if key:
        cache.store_baseline_eval(key, result)
    return result


def _reward_first_last(rows: list[dict], n: int = 5) -> tuple[float | None, float | None]:
    """Mean sampled reward of the first and the last n rollouts (not steps: a rollout serves several)."""
    by_rollout: dict[Any, float] = {}
    for row in rows:
        if row.get("reward_mean") is not None:
            by_rollout.setdefault(row.get("rollout", row["step"]), row["reward_mean"])
    values = list(by_rollout.values())
    if not values:
        return None, None
    first, last = values[:n], values[-n:]
    return sum(first) / len(first), sum(last) / len(last)


def train_main(argv: list[str] | None = None) -> int:
    """`tepo train`: its exit status. A run that opened a process group (several processes, or a
    colocated vLLM engine) ends the process itself (`end_process_group_run`) instead of returning."""
    from tepo.training.distributed import end_process_group_run, process_group_size, shutdown_distributed

    try:
        code = _train(list(sys.argv[1:] if argv is None else argv))
    except BaseException:
        if process_group_size() > 1:  # accelerate's group; no barrier: the peers may never reach it
            shutdown_distributed(synchronise=False)
        raise
    if process_group_size():  # several processes, or a colocated vLLM engine's group
        end_process_group_run(code)
    return code


def _train(argv: list[str]) -> int:
    from tepo.training.callbacks import quiet_console

    started = time.perf_counter()
    quiet_console()  # before the config is built: TRL's config itself raises one of the notices
    try:
        script, config = parse(argv)
        train_problems, heldout = load_problems(script)
        test_problems = load_test_problems(script, train_problems, heldout)
        # gold answers parsed once, now: one that cannot be judged is reported before any model loads
        from tepo.rewards import prepare_golds

        for source, problems in ((script.data or script.task, train_problems), (script.heldout_data or script.task, heldout),
                                 (script.task, test_problems)):
            prepare_golds(problems or [], source=str(source))
        resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"tepo train: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    from tepo.models import resolve_model
    from tepo.tasks import to_prompt_dataset
    from tepo.run_folder import EVAL_AFTER_FILE, EVAL_BEFORE_FILE, EVAL_TEST_FILE, METRICS_FILE, RUN_FILE, read_metrics, write_json
    from tepo.training.trainer import TEPOTrainer, summarize_hparams

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(script.model)
    dataset = to_prompt_dataset(train_problems)
    main = _is_main_process()
    if main:
        write_json(out / RUN_FILE, default=str, data={
            "command": "tepo train " + " ".join(argv),
            "model": model_path,
            "script": asdict(script),
            "objective": summarize_hparams(config),
            "num_train_problems": len(train_problems),
            "num_heldout_problems": len(heldout) if heldout else 0,
            "config": config.to_dict(),
        })
    _say(f"tepo train: {config.objective} on {len(train_problems)} problems, model {model_path}, "
         f"{config.max_steps} steps -> {out}")

    # In-training evaluations use the batches of the ones before and after: in bf16, another batch size
    # (other padding) alone flips a few greedy answers, and the curve's last point must equal the table's.
    reward_funcs = None  # TEPOTrainer's default: the answer check
    if script.soft_overlong_cache is not None:
        from tepo.rewards import math_reward_func

        reward_funcs = [math_reward_func, overlong_reward(script, config)]  # summed (reward_weights 1, 1)
    trainer = TEPOTrainer(model=model_path, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                          heldout_problems=heldout, heldout_batch_size=script.heldout_batch_size)
    max_new = config.heldout_max_new_tokens or config.max_completion_length

    before = None
    if heldout:
        if resume and (out / EVAL_BEFORE_FILE).exists():
            before = json.loads((out / EVAL_BEFORE_FILE).read_text())
        else:
            before = evaluate_untrained(trainer, heldout, script=script, model_path=model_path, max_new_tokens=max_new)
            if main:
                write_json(out / EVAL_BEFORE_FILE, before, default=str)
            _say(f"tepo train: held-out accuracy before: {before['accuracy']:.1%}"
                 + (" (reused: same model, problems, settings and code as an earlier run)" if "cached_from" in before else ""))

    train_started = time.perf_counter()
    done = resume is not None and _checkpoint_step(resume) >= config.max_steps > 0
    if done:  # transformers would run one more step past max_steps when resumed at the end
        _say(f"tepo train: {resume} is already at max_steps={config.max_steps}; nothing to train")
        trainer.state.global_step = _checkpoint_step(resume)
        trainer.load_checkpoint(resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - train_started
    guard = trainer.nonfinite_guard
    if guard.stopped_at is not None:
        print(f"tepo train: {guard.message}", file=sys.stderr)
        return EXIT_STOPPED

    trainer.save_model(str(out))
    after = None
    if heldout:
        step = int(trainer.state.global_step)
        done_in_training = trainer.heldout_callback.results.get(step) if trainer.heldout_callback else None
        if done_in_training is not None:  # the last in-training evaluation was of these very weights
            after = {"step": step, "max_new_tokens": max_new, **done_in_training}
        else:
            _say("tepo train: held-out greedy accuracy after training...")
            after = heldout_eval(trainer, heldout, max_new_tokens=max_new, batch_size=script.heldout_batch_size, step=step)
        if main:
            write_json(out / EVAL_AFTER_FILE, after, default=str)
    if test_problems:
        _say(f"tepo train: greedy accuracy on {len(test_problems)} test problems...")
        tested = heldout_eval(trainer, test_problems, max_new_tokens=max_new, batch_size=script.heldout_batch_size,
                              step=int(trainer.state.global_step))
        if main:
            write_json(out / EVAL_TEST_FILE, tested, default=str)

    rows = read_metrics(out / METRICS_FILE) if (out / METRICS_FILE).exists() else []
    first, last = _reward_first_last(rows)
    lines = [
        "",
        f"tepo train: done ({config.objective})",
        f"  steps              {trainer.state.global_step} (this run: {len(rows)} rows in metrics.jsonl)",
        f"  time               training {train_seconds:.0f} s, total {time.perf_counter() - started:.0f} s",
    ]
    if first is not None:
        lines.append(f"  sampled reward     {first:.3f} (first 5 rollouts) -> {last:.3f} (last 5)")
    if before is not None and after is not None:
        lines.append(
            f"  held-out accuracy  {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
            f"(greedy, {after['num_problems']} problems, {max_new} new tokens)"
        )
    if trainer.nonfinite_guard.skipped:
        lines.append(f"  non-finite steps   {trainer.nonfinite_guard.skipped} skipped")
    monitor = trainer.monitor_callback
    if monitor is not None and monitor.monitor.active():
        lines.append(f"  stability monitor  {', '.join(monitor.monitor.active())} (see monitor.json)")
    if test_problems:
        lines.append(f"  test accuracy      {tested['accuracy']:.1%} (greedy, {tested['num_problems']} problems, eval_test.json)")
    lines.append(f"  outputs            {out}/ (metrics.jsonl, eval_*.json, model)")
    lines.append(f"  report             tepo report {out}")
    if main:
        print("\n".join(lines))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(train_main())
