"""The prepared GPU benchmark (`bench/gpu.sh`) runs end to end on this CPU with everything shrunk
(GPU_BENCH_TINY=1), so the one device run a session may get is not spent on a broken script."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_gpu_sh(env: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def render_from_json(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--from_json", str(path), "--no_write"],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_gpu_bench_dry_run_as_prepared_for_the_device(tmp_path):
    gpu_dir, out = tmp_path / "gpu", tmp_path / "out"
    prep = run_gpu_sh({"GPU_DIR": str(gpu_dir)}, "prepare")
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert (gpu_dir / "qwen2.5-0.5b-smolvocab" / "config.json").is_file()
    doc = ROOT / "docs" / "benchmarks.md"
    before = hashlib.sha256(doc.read_bytes()).hexdigest()

    # the device run's knobs (compilation per decoder layer here), memory part left on so that it runs too
    done = run_gpu_sh({"GPU_DIR": str(gpu_dir), "OUT": str(out), "GPU_BENCH_TINY": "1", "TORCH_COMPILE": "1",
                       "REGIONAL": "1", "REPEATS": "2", "STEPS": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "status 0" in log

    steps = json.loads((out / "train_step.json").read_text())
    assert "partial" not in steps  # the final results replaced the per-trainer snapshots
    assert steps["settings"]["torch_compile"] is True and steps["settings"]["regional_compile"] is True
    assert steps["settings"]["repeats"] == 2
    for kind in ("stock", "tepo"):
        assert steps[kind]["steps"] == 2 and len(steps[kind]["step_s"]) == 2  # one step in each of two rounds
        assert len(steps[kind]["warmup_step_s"]) == 2
        assert steps[kind]["update_tok_per_s"] > 0 and steps[kind]["generated_tok_per_s"] > 0
    assert steps["compile_stats"]["unique_graphs"] >= 1  # the training forward really went through dynamo
    assert steps["ratio_tepo_over_stock"] > 0 and steps["ratio_without_generation"] > 0

    # the section renders from the saved results, and from a snapshot of a run stopped after one trainer
    rendered = render_from_json(out / "train_step.json")
    assert rendered.returncode == 0 and "**Step-time ratio tepo / stock: " in rendered.stdout, rendered.stderr
    assert "torch.compile: " in rendered.stdout and "torch.compile on, per decoder layer" in rendered.stdout
    snapshot = {k: v for k, v in steps.items() if k not in ("tepo", "ratio_tepo_over_stock", "ratio_without_generation")}
    (out / "partial.json").write_text(json.dumps({**snapshot, "partial": "stopped after stock round 0; results so far"}))
    rendered = render_from_json(out / "partial.json")
    assert rendered.returncode == 0, rendered.stderr
    assert "Partial run: stopped after stock round 0" in rendered.stdout and "not measured" in rendered.stdout

    memory = json.loads((out / "memory_gpu.json").read_text())
    assert [p["batch_size"] for p in memory["points"]] == [2, 4]
    assert all(p["peak_gib"] > 0 for p in memory["points"])
    fit = memory["fit"]  # at these tiny shapes the peak RSS may not grow with the batch (below its noise)
    assert (fit["batch_size"] is None and "cannot extrapolate" in fit["how"]) or fit["batch_size"] >= 4, fit
    # the dry run writes nothing to docs/
    assert hashlib.sha256(doc.read_bytes()).hexdigest() == before


def test_exact_length_prompts():
    """SmolLM2's tokenizer re-tokenizes cut-and-decoded ids to other lengths (the old benchmark prompts
    were 116-125 tokens for 128); the helper's prompts are exactly as long as asked."""
    from transformers import AutoTokenizer

    from tepo.models import resolve_model
    from tepo.tasks import load_task

    sys.path.insert(0, str(ROOT / "bench"))
    from _prompts import exact_length_prompt

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    problems = [p["problem"] for p in load_task(task="arithmetic", split="train", num_problems=40, levels=[1, 2])]

    def naive(text, n):  # what the benchmarks did before
        ids = tok(text + " ", add_special_tokens=False)["input_ids"]
        return tok.decode((ids * (n // len(ids) + 1))[:n])

    assert {len(tok(text=naive(p, 128))["input_ids"]) for p in problems} != {128}
    for n in (16, 128):
        assert {len(tok(text=exact_length_prompt(tok, p, n))["input_ids"]) for p in problems} == {n}


def _main_job_run(folder: Path, verdicts: list[bool], *, kib: int = 10_485_760) -> None:
    """The files `tepo train` and `/usr/bin/time -v` leave for one main-job run, with these
    held-out verdicts after training (all wrong before); 8 steps, a rollout every 4."""
    folder.mkdir(parents=True)
    ids = [f"p{i}" for i in range(len(verdicts))]
    rows = [{"step": s, "rollout": float((s - 1) // 4 + 1), "step_time_s": 90.0 if (s - 1) % 4 == 0 else 30.0,
             "entropy_mean": 0.5} for s in range(1, 9)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval_before.json").write_text(json.dumps({"ids": ids, "accuracy": 0.0, "verdicts": [False] * len(ids)}))
    (folder / "eval_after.json").write_text(json.dumps({"ids": ids, "accuracy": sum(verdicts) / len(ids), "verdicts": verdicts}))
    (folder / "time.txt").write_text(f"\tElapsed (wall clock) time (h:mm:ss or m:ss): 28:30.44\n"
                                     f"\tMaximum resident set size (kbytes): {kib}\n")


def test_main_job_backends_summarises_the_stored_runs(tmp_path, capsys):
    """`bench/main_job_backends.py` (the README's vLLM-vs-HF rows) on constructed runs: per-run rows
    from the files, and vLLM minus HF from the stored verdicts (every problem right with vLLM, half
    with HF: +50 points)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import main_job_backends

    for seed in (0, 1):
        _main_job_run(tmp_path / f"hf-s{seed}", [True, False] * 10)
        _main_job_run(tmp_path / f"vllm-s{seed}", [True] * 20, kib=2 * 10_485_760)
    assert main_job_backends.main(["--results", str(tmp_path), "--no_write"]) == 0
    out = capsys.readouterr().out
    assert "| Hugging Face generate | 1 | 28m30s | 90 | 30 | 10.0 GiB | 0.0% -> 50.0% | 0.500 -> 0.500 |" in out
    assert "| vLLM colocate (fp32 engine) | 0 | 28m30s | 90 | 30 | 20.0 GiB | 0.0% -> 100.0% |" in out
    assert "vLLM minus HF +50.0 points" in out

    (tmp_path / "vllm-s1" / "time.txt").write_text("nothing of /usr/bin/time here\n")
    with pytest.raises(ValueError, match="vllm-s1/time.txt"):
        main_job_backends.main(["--results", str(tmp_path), "--no_write"])


def test_main_job_shared_prefix_summarises_the_stored_runs(tmp_path, capsys):
    """`bench/main_job_shared_prefix.py` on constructed runs: shared right on every problem, plain on
    half (seed 0) and on 3 in 4 (seed 1): +50 and +25 points, t-interval over the two seeds."""
    sys.path.insert(0, str(ROOT / "bench"))
    import main_job_shared_prefix

    for seed, plain in ((0, [True, False] * 10), (1, [True, True, True, False] * 5)):
        _main_job_run(tmp_path / f"shared-s{seed}", [True] * 20)
        _main_job_run(tmp_path / f"plain-s{seed}", plain)
    assert main_job_shared_prefix.main(["--results", str(tmp_path), "--no_write"]) == 0
    out = capsys.readouterr().out
    assert "| shared_prefix: true (default) | 1 | 28m30s | 90.0 | 30.0 | 10.0 GiB | 0.0% -> 100.0% |" in out
    assert "shared minus plain: +37.5 points (seed 0: +50.0, seed 1: +25.0;" in out
    # t(0.975, df=1) = 12.706; std of (50, 25) = 17.68; half width = 12.706 * 17.68 / sqrt(2) = 158.8
    assert "95% t-interval over the 2 seeds -121.3 to +196.3" in out
    assert "In 0 of 2 seeds the two variants gave the same verdict" in out


def test_speed_bench_renders_the_committed_results():
    """`bench/speed.py --from_json` on the committed measurement: the ratios in docs/benchmarks.md."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--from_json",
                           str(ROOT / "results" / "bench" / "speed.json"), "--no_write"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((ROOT / "results" / "bench" / "speed.json").read_text())
    ratio = r["tepo"]["step_s_mean"] / r["stock"]["step_s_mean"]
    assert f"**Mean optimiser step, tepo / stock TRL: {ratio:.2f}**" in done.stdout
    base = r["eval"]["runs"][r["eval"]["baseline"]]["generate_s"]
    shared = r["eval"]["runs"]["shared@64"]
    assert f"| shared | 64 | {shared['generate_s']:.1f} | {base / shared['generate_s']:.2f}x |" in done.stdout
    # docs/benchmarks.md shows exactly what the committed measurement renders to
    assert done.stdout.strip() in (ROOT / "docs" / "benchmarks.md").read_text()
