"""The evaluation runner and the HF generation backend.

A fake backend with fixed completions pins the verdict path (estimates checked against numbers
worked out by hand and recomputed from samples.jsonl); a tiny random Llama with the SmolLM2
tokenizer exercises the real HF backend in seconds.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tepo.evaluation.generation import HFBackend, RowSeededSampler, Sample, derive_seed
from tepo.evaluation.runner import (
    GREEDY,
    ConfigMismatchError,
    evaluate,
    evaluate_problems,
    greedy_accuracy,
    read_samples,
)

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("TEPO_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(), reason=f"benchmark data not found at {DATA_DIR} (set TEPO_DATA_DIR)"
)


class FakeBackend:
    """Returns fixed completions: ``table[problem] = {"samples": [...], "greedy": "..."}``."""

    def __init__(self, table: dict, batch_size: int = 4, name: str = "fake"):
        self.table, self.batch_size, self.name = table, batch_size, name
        self.calls: list[tuple[str, int, float]] = []

    def generate(self, messages_list, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, seed=0):
        out = []
        for messages in messages_list:
            content = messages[-1]["content"]  # the prompt wraps the problem; find which one it holds
            problem = max((q for q in self.table if q in content), key=len)
            self.calls.append((problem, n, temperature))
            texts = [self.table[problem]["greedy"]] if temperature == 0 else self.table[problem]["samples"][:n]
            assert len(texts) == n
            out.append([Sample(text=t, num_tokens=len(t), truncated=t.endswith("...")) for t in texts])
        return out


# Four problems, n = 4; verdicts and majority answers chosen so that every estimate differs.
PROBLEMS = [
    {"id": "p1", "problem": "What is 3 + 4?", "answer": "7"},
    {"id": "p2", "problem": "What is half of 1?", "answer": "\\frac{1}{2}"},
    {"id": "p3", "problem": "What is 5 + 5?", "answer": "10"},
    {"id": "p4", "problem": "What is 2 + 3?", "answer": "5"},
]
TABLE = {
    "What is 3 + 4?": {"samples": ["So \\boxed{7}.", "\\boxed{7}", "\\boxed{8}", "I am not sure..."], "greedy": "\\boxed{7}"},
    # 0.5 and \frac{1}{2} share a canonical form: it ties with 3 and wins as the earlier answer
    "What is half of 1?": {"samples": ["\\boxed{0.5}", "\\boxed{3}", "\\boxed{3}", "\\boxed{\\frac{1}{2}}"], "greedy": "\\boxed{2}"},
    "What is 5 + 5?": {"samples": ["\\boxed{11}"] * 4, "greedy": "The final answer is 10."},
    "What is 2 + 3?": {"samples": ["\\boxed{6}", "\\boxed{5}", "\\boxed{6}", "\\boxed{6}"], "greedy": "\\boxed{5}"},
}


def _pass(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_estimates_worked_out_by_hand(tmp_path):
    backend = FakeBackend(TABLE)
    r = evaluate_problems(backend, PROBLEMS, benchmark="toy", n=4, ks=[1, 2, 4], greedy=True, samples_path=tmp_path / "s.jsonl")
    counts = [2, 2, 0, 1]
    assert r["num_problems"] == 4 and r["n"] == 4
    assert r["avg@4"] == pytest.approx(sum(Fraction(c, 4) for c in counts) / 4)  # 5/16
    for k in (1, 2, 4):
        assert r[f"pass@{k}"] == pytest.approx(float(sum(_pass(4, c, k) for c in counts) / 4))
    assert r["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 0 + 0.5) / 4)
    # maj@1: first sample right in p1, p2; maj@2: p1 (7,7), p2 (1/2 vs 3 tie -> 1/2); maj@4: p1, p2; p4's majority is 6
    assert (r["maj@1"], r["maj@2"], r["maj@4"]) == (0.5, 0.5, 0.5)
    assert r[GREEDY] == 0.75  # "The final answer is 10." counts; \boxed{2} does not
    assert r["no_answer_rate"] == pytest.approx(1 / 16)
    assert r["truncation_rate"] == pytest.approx(1 / 16)
    assert r["pass_curve"][4] == pytest.approx(r["pass@4"])
    lo, hi = r["ci"]["avg@4"]
    assert 0 <= lo <= r["avg@4"] <= hi <= 1
    assert r["new_samples"] == 20 and r["reused_samples"] == 0
    assert r["verify_s"] >= 0 and r["generate_s"] >= 0


def _recompute(rows, n, ks):
    """avg@n, pass@k and maj@k from samples.jsonl rows, written out independently of the runner."""
    by_id: dict[str, dict] = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["sample"]] = row
    out = {f"avg@{n}": 0.0, **{f"pass@{k}": 0.0 for k in ks}, **{f"maj@{k}": 0.0 for k in ks}}
    for samples in by_id.values():
        c = sum(samples[j]["correct"] for j in range(n))
        out[f"avg@{n}"] += c / n / len(by_id)
        for k in ks:
            out[f"pass@{k}"] += float(1 - Fraction(math.comb(n - c, k), math.comb(n, k))) / len(by_id)
            votes = Counter(samples[j]["canonical"] for j in range(k) if samples[j]["canonical"] is not None)
            if votes:
                top = max(votes.values())
                winner = next(samples[j] for j in range(k) if votes.get(samples[j]["canonical"]) == top)
                out[f"maj@{k}"] += winner["correct"] / len(by_id)
    return out


def test_estimates_agree_with_samples_file_on_random_verdicts(tmp_path):
    rng = random.Random(7)
    problems, table = [], {}
    for i in range(40):
        gold = rng.randint(1, 5)
        problems.append({"id": f"q{i}", "problem": f"question {i}", "answer": str(gold)})
        skill = rng.random()
        table[f"question {i}"] = {
            "samples": [f"\\boxed{{{gold if rng.random() < skill else rng.randint(1, 5)}}}" if rng.random() < 0.9 else "no idea" for _ in range(8)],
            "greedy": f"\\boxed{{{gold}}}",
        }
    path = tmp_path / "samples.jsonl"
    r = evaluate_problems(FakeBackend(table, batch_size=16), problems, benchmark="rand", n=8, ks=[1, 2, 4, 8], samples_path=path)
    rows = read_samples(path)
    assert len(rows) == 40 * 8
    # every verdict in the file is the verifier's verdict on the stored completion
    assert all(row["correct"] == (row["answer"] is not None and int(row["answer"]) == int(row["gold"])) for row in rows)
    expected = _recompute(rows, 8, [1, 2, 4, 8])
    assert 0 < expected["avg@8"] < 1
    for name, value in expected.items():
        assert r[name] == pytest.approx(value, abs=1e-12), name


def test_resume_skips_scored_samples_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    kwargs = dict(benchmark="toy", n=4, ks=[1, 4], greedy=True, samples_path=path)
    first = evaluate_problems(FakeBackend(TABLE), PROBLEMS, **kwargs)
    full = path.read_text().splitlines()
    assert len(full) == 20

    again = FakeBackend(TABLE)
    second = evaluate_problems(again, PROBLEMS, **kwargs)
    assert again.calls == []
    assert second["new_samples"] == 0 and second["reused_samples"] == 20
    estimates = [k for k in first if "@" in k or k == GREEDY]
    assert {k: second[k] for k in estimates} == {k: first[k] for k in estimates}

    # a crash: the last three rows never made it and the one before is half written
    kept = full[:16]
    path.write_text("\n".join(kept) + "\n" + full[16][: len(full[16]) // 2])
    assert len(read_samples(path)) == 16
    third_backend = FakeBackend(TABLE)
    third = evaluate_problems(third_backend, PROBLEMS, **kwargs)
    lost = {(json.loads(line)["id"], json.loads(line)["sample"]) for line in full[16:]}
    assert third["new_samples"] == len(lost) == 4
    assert {p for p, _, _ in third_backend.calls} == {next(q["problem"] for q in PROBLEMS if q["id"] == i) for i, _ in lost}
    assert {k: third[k] for k in estimates} == {k: first[k] for k in estimates}
    rows = read_samples(path)  # the torn line was cut off, not glued to the next row
    assert len(rows) == 20 and len({(r["id"], r["sample"]) for r in rows}) == 20


def test_a_bad_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a", "sample": 0}\nnot json\n{"id": "a", "sample": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_samples(path)


def test_k_above_n_and_greedy_temperature_are_refused():
    with pytest.raises(ValueError, match="k"):
        evaluate_problems(FakeBackend(TABLE), PROBLEMS, benchmark="toy", n=2, ks=[1, 4])
    with pytest.raises(ValueError, match="temperature"):
        evaluate_problems(FakeBackend(TABLE), PROBLEMS, benchmark="toy", n=2, ks=[1], temperature=0.0)


def test_greedy_only(tmp_path):
    r = evaluate_problems(FakeBackend(TABLE), PROBLEMS, benchmark="toy", n=0, ks=[], greedy=True)
    assert r[GREEDY] == 0.75 and "avg@0" not in r and r["greedy_no_answer_rate"] == 0


def _write_data(root: Path, name: str = "gsm8k") -> Path:
    (root / name).mkdir(parents=True)
    with open(root / name / "test.jsonl", "w") as f:
        for p in PROBLEMS:
            f.write(json.dumps(p) + "\n")
    return root


def test_evaluate_writes_results_and_refuses_a_config_mismatch(tmp_path):
    data = _write_data(tmp_path / "data")
    out = tmp_path / "out"
    common = dict(benchmarks=["gsm8k"], n=4, ks=[1, 4], temperature=0.6, greedy=True, data_dir=data, max_new_tokens=32, output_dir=out)
    results = evaluate(FakeBackend(TABLE), **common)
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmarks"]["gsm8k"]["avg@4"] == pytest.approx(5 / 16)
    assert saved["benchmarks"]["gsm8k"]["ci"]["pass@4"][1] <= 1
    assert saved["config"]["n"] == 4 and saved["config"]["model"] == "fake"
    assert set(saved["macro"]) >= {"avg@4", "pass@1", "pass@4", "maj@4", GREEDY}
    assert results["benchmarks"]["gsm8k"]["pass@1"] == saved["benchmarks"]["gsm8k"]["pass@1"]
    md = (out / "results.md").read_text()
    assert "| gsm8k | 4 |" in md and "avg@4" in md
    rows = read_samples(out / "samples.jsonl")
    assert {r["benchmark"] for r in rows} == {"gsm8k"} and len(rows) == 20
    assert set(rows[0]) >= {"benchmark", "id", "sample", "completion", "answer", "correct"}

    with pytest.raises(ConfigMismatchError, match="temperature"):
        evaluate(FakeBackend(TABLE), **{**common, "temperature": 1.0})
    with pytest.raises(ConfigMismatchError, match="model"):
        evaluate(FakeBackend(TABLE, name="other"), **common)
    # settings that do not change the samples may change: more k, no greedy pass
    evaluate(FakeBackend(TABLE), **{**common, "ks": [1, 2, 4], "greedy": False})


# --------------------------------------------------------------------------------------------
# the HF backend on a tiny random model


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tepo.models import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _chat(q):
    return [{"role": "user", "content": q}]


def test_hf_sampling_is_seeded_per_prompt_not_per_batch(tiny):
    model, tok = tiny
    msgs = [_chat("What is 2 + 2?"), _chat("A much longer question about 17 times 3, please?")]
    a = HFBackend.from_model(model, tok, batch_size=3).generate(msgs, n=4, temperature=1.0, max_new_tokens=6, seed=1)
    b = HFBackend.from_model(model, tok, batch_size=16).generate(msgs, n=4, temperature=1.0, max_new_tokens=6, seed=1)
    assert a == b
    assert [len(s) for s in a] == [4, 4]
    assert len({s.text for s in a[0]}) > 1  # the n samples differ
    alone = HFBackend.from_model(model, tok, batch_size=2).generate(msgs[1:], n=4, temperature=1.0, max_new_tokens=6, seed=[derive_seed(1, 1)])
    assert alone[0] == a[1]  # a prompt's samples do not depend on what else is in the call
    other = HFBackend.from_model(model, tok, batch_size=16).generate(msgs, n=4, temperature=1.0, max_new_tokens=6, seed=2)
    assert other != a
    s = a[0][0]
    assert s.num_tokens == 6 and s.truncated  # a random model does not stop by itself


def test_row_seeded_sampler_draws_from_the_tempered_nucleus():
    logits = torch.tensor([[0.0, 1.0, 2.0, -50.0]])
    probs = logits.softmax(-1)[0]  # 0.090, 0.245, 0.665, ~0

    def draws(temperature, top_p, count=6000):
        sampler = RowSeededSampler([torch.Generator().manual_seed(3)], temperature, top_p)
        return Counter(int(sampler(None, logits).argmax()) for _ in range(count))

    full = draws(1.0, 1.0)
    assert 3 not in full
    for token in range(3):
        assert abs(full[token] / 6000 - float(probs[token])) < 0.025
    nucleus = draws(1.0, 0.8)  # 0.665 < 0.8 keeps token 1; 0.665 + 0.245 >= 0.8 drops token 0
    assert set(nucleus) == {1, 2}
    assert abs(nucleus[2] / 6000 - 0.665 / 0.910) < 0.025
    cold = draws(0.25, 1.0)  # temperature 1/4: token 2 takes e^4/(1 + e^4 + e^8) of the draws
    assert abs(cold[2] / 6000 - math.exp(8) / (1 + math.exp(4) + math.exp(8))) < 0.01
    out = RowSeededSampler([torch.Generator().manual_seed(0)], 1.0, 1.0)(None, logits)
    assert torch.isfinite(out).sum() == 1 and out.max() == 0


@pytest.mark.parametrize("scale", [3.0, 0.01])  # peaked: the top-1024 shortcut decides; flat: the full sort
def test_nucleus_matches_a_full_sort(scale):
    torch.manual_seed(0)
    probs = (torch.randn(4, 49152) * scale).softmax(-1)
    got = RowSeededSampler([], 1.0, 0.9)._nucleus(probs)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < 0.9
    expected = torch.zeros_like(probs).scatter(1, order, sorted_probs * keep)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected)


def test_hf_greedy_equals_sampling_with_a_tiny_nucleus(tiny):
    model, tok = tiny
    backend = HFBackend.from_model(model, tok, batch_size=4)
    msgs = [_chat("What is 2 + 2?")]
    greedy = backend.generate(msgs, n=1, temperature=0.0, max_new_tokens=8)
    nucleus = backend.generate(msgs, n=3, temperature=1.0, top_p=1e-9, max_new_tokens=8, seed=5)
    assert all(s == greedy[0][0] for s in nucleus[0])
    with pytest.raises(ValueError, match="identical"):
        backend.generate(msgs, n=2, temperature=0.0)


def test_hf_stops_at_eos_and_restores_training_mode(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 100.0  # the end token wins every step
    original, model.lm_head = model.lm_head, head
    model.train()
    try:
        backend = HFBackend.from_model(model, tok, batch_size=4)
        [[sample]] = backend.generate([_chat("hi")], n=1, temperature=0.0, max_new_tokens=8)
        assert model.training
    finally:
        model.lm_head = original
        model.eval()
    assert sample == Sample(text="", num_tokens=1, truncated=False)
    # decoding of a finished row: the end token counts, the padding after it does not
    backend = HFBackend.from_model(model, tok)
    word = tok("seven", add_special_tokens=False)["input_ids"]
    assert backend._to_sample(word + [eos, eos, eos]) == Sample(text="seven", num_tokens=len(word) + 1, truncated=False)
    assert backend._to_sample(word) == Sample(text="seven", num_tokens=len(word), truncated=True)


def test_greedy_accuracy_takes_a_backend_or_a_model_and_tokenizer(tiny):
    r = greedy_accuracy(FakeBackend(TABLE), PROBLEMS, max_new_tokens=16)
    assert (r["accuracy"], r["correct"], r["num_problems"]) == (0.75, 3, 4)
    assert r["verdicts"] == [True, False, True, True] and r["ids"] == ["p1", "p2", "p3", "p4"]
    assert r["answers"][1] == "2" and r["no_answer"] == 0

    model, tok = tiny
    r = greedy_accuracy((model, tok), PROBLEMS[:2], max_new_tokens=4, batch_size=2)
    assert r["num_problems"] == 2 and r["correct"] == sum(r["verdicts"]) and r["truncated"] == 2
    assert r["mean_completion_tokens"] == 4


@needs_data
def test_evaluate_on_benchmark_files_with_a_tiny_model(tiny, tmp_path):
    model, tok = tiny
    backend = HFBackend.from_model(model, tok, batch_size=8)
    out = tmp_path / "out"
    r = evaluate(backend, benchmarks=["gsm8k", "math500"], n=2, ks=[1, 2], greedy=True, limit=2, data_dir=DATA_DIR,
                 max_new_tokens=4, output_dir=out)
    rows = read_samples(out / "samples.jsonl")
    assert len(rows) == 2 * 2 * 3
    for name in ("gsm8k", "math500"):
        b = r["benchmarks"][name]
        assert b["num_problems"] == 2 and b["mean_completion_tokens"] == 4 and b["truncation_rate"] == 1.0
        mine = [row for row in rows if row["benchmark"] == name and row["sample"] != GREEDY]
        expected = _recompute(mine, 2, [1, 2])
        assert all(b[k] == pytest.approx(v, abs=1e-12) for k, v in expected.items())
    first_gold = json.loads((DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["answer"]
    assert next(row["gold"] for row in rows if row["id"] == "gsm8k-test-0000") == first_gold


@pytest.mark.parametrize("avx512_bf16, amx, autocast", [(False, False, None), (True, False, torch.bfloat16),
                                                         (False, True, torch.bfloat16)])
def test_auto_dtype_on_cpu_autocasts_to_bf16_only_where_the_cpu_has_it(tiny, tmp_path, monkeypatch, avx512_bf16, amx, autocast):
    # without AVX512-BF16 or AMX torch emulates bf16 and autocast makes generation slower, not faster
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    backend = HFBackend.from_pretrained(str(tmp_path / "m"), dtype="auto", device="cpu")
    assert backend.autocast_dtype == autocast
    assert next(backend.model.parameters()).dtype == torch.float32
