"""One update micro-batch of the quickstart shape under torch.profiler, plain path vs shared prefix (CPU).

16 rows drawn from a rollout of 8 prompts x 8 completions as TRL shuffles them (7 distinct prompts),
~130 prompt + 48 completion tokens, forward + backward through TRL's fused LM head. Prints the time of
each and the top ops by self CPU time (docs/benchmarks.md, "The shared-prefix path").

    flock /tmp/tepo-cpu.lock .venv/bin/python bench/update_profile.py
"""
import time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import add_fused_lm_head
from tepo.models import resolve_model
from tepo.shared_prefix import add_shared_prefix_forward
from tepo.tasks import load_task, to_prompt_dataset
from torch.profiler import profile, ProfilerActivity
path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy")); add_shared_prefix_forward(model, temperature=0.7)
ds = to_prompt_dataset(load_task(task="arithmetic", split="train", num_problems=8, levels=[1, 2]))
prompts = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for r in ds]
C = 48; P = max(map(len, prompts))
torch.manual_seed(0)


def batch(groups):
    """16 rows, row r a completion of prompt groups[r] (40 of its 48 tokens valid)."""
    ids = torch.full((len(groups), P + C), tok.pad_token_id)
    m = torch.zeros_like(ids)
    for r, g in enumerate(groups):
        p = prompts[g]
        ids[r, P - len(p):P], m[r, P - len(p):P] = torch.tensor(p), 1
        ids[r, P:], m[r, P:P + 40] = torch.randint(100, 1000, (C,)), 1
    lab = ids.masked_fill(m == 0, -100)
    lab[:, :-C] = -100
    return ids, m, lab


def step(ids, m, lab, shared):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=m, labels=lab, fused_lm_head=True, **({"shared_prefix": C} if shared else {}))
    (out.log_probs[:, -C:].sum() + out.entropy[:, -C:].sum()).backward()


shuffled = torch.randperm(64)[:16].div(8, rounding_mode="floor").tolist()  # TRL's row shuffle: ~7 prompts
for name, groups in ((f"{len(set(shuffled))} prompts (shuffled rows)", shuffled), ("2 prompts (whole groups)", [0] * 8 + [1] * 8)):
    rows = batch(groups)
    for shared in (False, True):
        step(*rows, shared)
        t = time.perf_counter()
        step(*rows, shared)
        print(f"{name}, {'shared prefix' if shared else 'plain'}: {time.perf_counter() - t:.2f} s", flush=True)
        if groups is shuffled:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(*rows, shared)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
