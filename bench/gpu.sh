#!/usr/bin/env bash
# The one prepared GPU benchmark run (H100 machine of the device tool, < 8 minutes in all):
#   1. install the carried wheels (trl, datasets, math-verify, transformers 5.24, ...) into /tmp/site
#   2. versions and the card
#   3. bench/train_step.py: TEPOTrainer (tepo) vs stock TRL GRPOTrainer, same call, same model:
#      step time, generated tokens/s, update-phase tokens/s and MFU (vs 989 TFLOP/s bf16 dense)
#   4. bench/memory.py: peak torch.cuda memory of one step at 16/32/64 completions per
#      micro-batch, and the largest that fits the card (measured, or a linear extrapolation said so)
# Results: $OUT/log (everything printed), $OUT/train_step.json, $OUT/memory_gpu.json and
# $OUT/benchmarks.md (docs/benchmarks.md with the two GPU sections written by the scripts).
#
# Model: Qwen2.5-0.5B's architecture (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
# 4864, tied embeddings) with random weights and SmolLM2's tokenizer, so its vocabulary is SmolLM2's
# 49,152 tokens (every id it can generate decodes): 401.9 M parameters instead of Qwen2.5-0.5B's
# 494.0 M (the embedding/LM head is 44.0 M instead of 136.1 M). Config and tokenizer: .gpu/
# (made here by bench/gpu.sh's `prepare` step; git-ignored, carried to the device).
#
# Device tool call:  run(command="bash bench/gpu.sh", carry=[".whl", ".gpu"], timeout_s=480), with the knobs below
# before "bash" (.whl: the wheels of $WHEELS below, fetched by `bash bench/gpu.sh wheels`)
# PROFILE=1 bash bench/gpu.sh: also one profiled update phase per trainer (torch.profiler top ops in
# $OUT/profile/; one extra step each, about 40 s more, not in the timings)
# Knobs for the update-phase MFU (both trainers alike, so the ratio stays like for like):
#   TORCH_COMPILE=1  TrainingArguments.torch_compile: forward/backward of training through torch.compile
#                    (inductor fuses RMSNorm/RoPE/SwiGLU element-wise work; generation stays eager)
#   REGIONAL=1       with TORCH_COMPILE=1: compile one decoder layer and reuse it for all 24 (accelerate's
#                    regional compilation): a fraction of the compile time, the same fusions inside each layer
#   LIGER=1          use_liger_kernel: Liger's Triton RMSNorm/SwiGLU/RoPE (carry its wheel in .whl)
#   MEMORY=0         skip the memory part (already in docs/benchmarks.md) to leave time for compilation
#   STEPS=N REPEATS=R  measured steps per trainer per round, rounds (stock, tepo, stock, tepo, ...)
#   SHARED_PREFIX=false  tepo on the plain path (shared_prefix: false); default true, tepo's default
#                    (issue 29 asks for one call with it on and off: run the script twice, OUT apart)
# The next device session's run:  TORCH_COMPILE=1 MEMORY=0 REPEATS=2 STEPS=2 bash bench/gpu.sh  (docs/benchmarks.md;
# train_step.json is rewritten after each trainer, so a time limit still leaves what was measured:
# `python bench/train_step.py --from_json $OUT/train_step.json` writes the section from it, marked partial)
# Dry run on a CPU with everything shrunk (no wheels installed, nothing written to docs/):
#   GPU_BENCH_TINY=1 PY=.venv/bin/python bash bench/gpu.sh
# Make .gpu/ and .whl/ (once, on the dev box):  PY=.venv/bin/python bash bench/gpu.sh prepare
#                                               PY=.venv/bin/python bash bench/gpu.sh wheels

set -u
set -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
TINY=${GPU_BENCH_TINY:-0}
GPU_DIR=${GPU_DIR:-$ROOT/.gpu}  # configs + tokenizer (made by `prepare`)
export GPU_DIR

prepare() {
    # Tokenizer of the offline default model + the two model configs (no weights: random init).
    set -e
    "$PY" - <<'EOF'
import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, Qwen2Config

from tepo.models import resolve_model

gpu = Path(os.environ["GPU_DIR"])
src = Path(resolve_model(None))
tok_dir = gpu / "tokenizer"
tok_dir.mkdir(parents=True, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).exists():
        shutil.copy(src / name, tok_dir / name)
tok = AutoTokenizer.from_pretrained(tok_dir)
common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, tie_word_embeddings=True, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, max_position_embeddings=32768, hidden_act="silu")
Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, **common).save_pretrained(gpu / "qwen2.5-0.5b-smolvocab")
Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **common).save_pretrained(gpu / "tiny-smolvocab")
print(f"prepared {gpu}: tokenizer ({len(tok)} tokens), qwen2.5-0.5b-smolvocab, tiny-smolvocab")
EOF
}

# The wheels the device machine lacks (it has torch + CUDA, no network): pinned to what this
# repository is tested with, for the device's Python 3.12, no dependencies resolved (the list is it).
WHEELS="trl==1.16.0 transformers==5.24.0 tokenizers==0.23.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 typer==0.29.2 shellingham==1.5.4
liger-kernel==0.8.5"
if [ "${1:-}" = "wheels" ]; then
    mkdir -p .whl
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS
    status=$?
    ls .whl
    exit $status
fi

if [ "${1:-}" = "prepare" ]; then
    export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
    prepare
    exit $?
fi

if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d /tmp/gpu-bench.XXXXXX)
fi
mkdir -p "$OUT"

main() {
    local start=$SECONDS status=0
    for need in "$GPU_DIR/tokenizer/tokenizer.json" "$GPU_DIR/qwen2.5-0.5b-smolvocab/config.json" "$GPU_DIR/tiny-smolvocab/config.json"; do
        if [ ! -f "$need" ]; then
            echo "gpu.sh: missing $need: run 'PY=.venv/bin/python bash bench/gpu.sh prepare' and carry .gpu"
            return 2
        fi
    done

    if [ "$TINY" = "1" ]; then
        echo "== GPU_BENCH_TINY=1: dry run on $(uname -m) CPU, shrunk sizes, docs/ untouched"
        export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
        DEVICE=cpu MODEL=$GPU_DIR/tiny-smolvocab NO_WRITE=--no_write
        TS_ARGS="--steps ${STEPS:-1} --repeats ${REPEATS:-1} --num_prompts 2 --num_generations 2 --steps_per_generation 1 --micro_batch 2 --gradient_checkpointing false --max_completion_length 8 --prompt_tokens 16"
        MEM_ARGS="--batch_sizes 2,4 --num_generations 2 --prompt_tokens 16 --completion_tokens 8"
        TS_LIMIT=600 MEM_LIMIT=600
    else
        echo "== installing carried wheels into /tmp/site"
        ls .whl/*.whl >/dev/null || { echo "gpu.sh: no .whl/*.whl: carry .whl"; return 2; }
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 3
        export PYTHONPATH=/tmp/site:$ROOT/src
        DEVICE=cuda MODEL=$GPU_DIR/qwen2.5-0.5b-smolvocab NO_WRITE=
        # spec/MEASURED.md's stock-TRL GPU run: 16 prompts x 8 completions, 128-token prompts,
        # 512 forced completion tokens, bf16, one optimiser step per rollout; the step's 128
        # completions go through forward/backward as 4 micro-batches of 32 without gradient
        # checkpointing (39.7 GiB peak; the update took as long as with recomputation, docs/benchmarks.md)
        TS_ARGS="--steps ${STEPS:-3} --repeats ${REPEATS:-1} --num_prompts 16 --num_generations 8 --steps_per_generation 1 --micro_batch 32 --gradient_checkpointing false --max_completion_length 512 --prompt_tokens 128"
        # memory: one micro-batch of 16/32/64 completions without gradient checkpointing (128 would
        # need ~134 GiB by the fit of the 2026-11-27 H100 run)
        MEM_ARGS="--batch_sizes 16,32,64 --num_generations 8 --prompt_tokens 128 --completion_tokens 512"
        # measured on an H100 (2026-11-27): train_step 3+1 steps per trainer ~175 s, memory ~170 s
        TS_LIMIT=260 MEM_LIMIT=210
        if [ "${MEMORY:-1}" = "0" ]; then
            TS_LIMIT=430  # compilation of each trainer's first step; the memory part's time goes to it
        fi
    fi
    if [ "${TORCH_COMPILE:-0}" = "1" ]; then
        TS_ARGS="$TS_ARGS --torch_compile"
    fi
    if [ "${REGIONAL:-0}" = "1" ]; then
        TS_ARGS="$TS_ARGS --regional_compile"
    fi
    if [ "${LIGER:-0}" = "1" ]; then
        TS_ARGS="$TS_ARGS --use_liger_kernel"
    fi
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

    echo "== versions"
    "$PY" - <<'EOF' || return 4
import platform, torch, transformers, trl, accelerate, datasets, tokenizers, math_verify
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| trl", trl.__version__, "| accelerate", accelerate.__version__,
      "| datasets", datasets.__version__, "| tokenizers", tokenizers.__version__)
print("torch.cuda.is_available():", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
import tepo, tepo.training.trainer  # the package imports with these versions
print("tepo", tepo.__version__, "from", tepo.__file__)
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "(no nvidia-smi)"
    fi

    echo "== train_step: tepo vs stock GRPOTrainer ($(( SECONDS - start )) s so far)"
    # shellcheck disable=SC2086
    timeout "$TS_LIMIT" "$PY" bench/train_step.py --device "$DEVICE" --model_config "$MODEL" \
        --tokenizer "$GPU_DIR/tokenizer" $TS_ARGS --shared_prefix "${SHARED_PREFIX:-true}" \
        ${PROFILE:+--profile "$OUT/profile"} --json "$OUT/train_step.json" $NO_WRITE || status=5

    if [ "${MEMORY:-1}" = "0" ]; then
        echo "== memory: skipped (MEMORY=0)"
    else
        echo "== memory: one optimiser step at several batch sizes ($(( SECONDS - start )) s so far)"
        # shellcheck disable=SC2086
        timeout "$MEM_LIMIT" "$PY" bench/memory.py --device "$DEVICE" --setup random --model_config "$MODEL" \
            --tokenizer "$GPU_DIR/tokenizer" $MEM_ARGS --json "$OUT/memory_gpu.json" $NO_WRITE || { [ "$status" -eq 0 ] && status=6; }
    fi

    if [ -f docs/benchmarks.md ]; then
        cp docs/benchmarks.md "$OUT/benchmarks.md"
    fi
    echo "== done in $(( SECONDS - start )) s, status $status; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    return $status
}

main 2>&1 | tee "$OUT/log"
