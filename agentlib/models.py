"""Chat model backends behind one interface: in-process transformers and OpenAI-compatible servers.

Every backend has

    chat(messages, n=1, temperature=0.0, top_p=1.0, max_tokens=512, stop=None, prefix=None) -> list[str]
    chat_batch(conversations, n=1, ..., prefixes=None) -> list[list[str]]
    session(n=1, ...) -> RoundSession   # submit requests, get each answer as it is ready (the agent's loop)

``prefix`` is text forced as the start of the assistant turn; outputs are the continuation only, with stop
strings cut off. ``.usage`` counts prompt/completion tokens and generation seconds.

- ``HFModel``: transformers in this process (bf16 on CPU), ``n`` samples per prompt, optional peft adapter;
  continuous batching with a prefix cache (``agentlib.decoding``).
- ``OpenAIModel``: one or more OpenAI-compatible servers (vLLM, llama.cpp, hosted APIs) as one pool:
  bounded concurrency, retries with backoff, least-outstanding routing, health checks, failover.
- ``load_model(name_or_path, backend="hf" | "openai" | "vllm" | "llamacpp")``.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Messages",
    "Usage",
    "Sampling",
    "cut_at_stop",
    "ChatModel",
    "RoundSession",
    "PACKED_SDPA",
    "HFModel",
    "HFSession",
    "RequestError",
    "Endpoint",
    "endpoints_from_env",
    "EndpointPool",
    "OpenAIModel",
    "load_model",
]

Messages = list[dict[str, str]]


@dataclass
class Usage:
    """Token and time counters, summed over calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a server took from its prompt cache instead of prefilling them
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # of ``seconds``, spent encoding prompts (HFModel; servers do not report it)
    calls: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        cached = f" ({self.cached_tokens:,} cached)" if self.cached_tokens else ""
        return (
            f"{self.completion_tokens:,} tokens generated, {self.prompt_tokens:,} prompt tokens{cached}, "
            f"{self.seconds:.1f} s, {self.tokens_per_s:.1f} tokens/s, {self.calls:,} calls"
        )

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = self.calls = 0
        self.seconds = self.prefill_seconds = 0.0


@dataclass(frozen=True)
class Sampling:
    """How to sample a completion: ``n`` of them per conversation, up to ``max_tokens`` each, cut at ``stop``."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: Sequence[str] | None = None


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class ChatModel:
    """The public calls (``chat``, ``chat_batch``, ``session``) over one method a backend implements:
    ``generate(conversations, prefixes, sampling)``."""

    usage: Usage

    def chat(
        self,
        messages: Messages,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 512,
        stop: Sequence[str] | None = None,
        prefix: str | None = None,
    ) -> list[str]:
        """``n`` completions of the assistant turn after ``messages`` (continuing ``prefix`` if given)."""
        return self.chat_batch(
            [messages],
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=stop,
            prefixes=[prefix],
        )[0]

    def chat_batch(
        self,
        conversations: Sequence[Messages],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 512,
        stop: Sequence[str] | None = None,
        prefixes: Sequence[str | None] | None = None,
    ) -> list[list[str]]:
        """``n`` completions for each conversation (continuing its prefix, if given)."""
        prefixes = list(prefixes) if prefixes is not None else [None] * len(conversations)
        sampling = Sampling(n, temperature, top_p, max_tokens, stop)
        return self.generate(list(conversations), prefixes, sampling)

    def generate(
        self, conversations: list[Messages], prefixes: list[str | None], sampling: Sampling
    ) -> list[list[str]]:
        """The backend's ``chat_batch``, with its arguments gathered."""
        raise NotImplementedError

    def prime(self, messages: Messages) -> None:
        """Warm a prompt cache with ``messages``, a prefix many following conversations share (no-op here)."""

    def session(
        self,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 512,
        stop: Sequence[str] | None = None,
    ) -> RoundSession:
        """Requests answered as they come (see ``RoundSession``; ``HFModel`` batches continuously)."""
        return self.open_session(Sampling(n, temperature, top_p, max_tokens, stop))

    def open_session(self, sampling: Sampling) -> RoundSession:
        return RoundSession(self, sampling)


def _usage_tokens(model: Any) -> tuple[float, float]:
    u = getattr(model, "usage", None)
    if u is None:
        return 0.0, 0.0
    get = u.get if isinstance(u, dict) else (lambda k, d=0: getattr(u, k, d))
    return float(get("prompt_tokens", 0) or 0), float(get("completion_tokens", 0) or 0)


def _shares(total: float, weights: Sequence[float], floors: Sequence[int] | None = None) -> list[int]:
    """Split a batch's token count by weight, each part first getting its floor (when the total covers them)."""
    floors = list(floors or [0] * len(weights))
    if total < sum(floors):
        floors = [0] * len(weights)
    rest, s = total - sum(floors), sum(weights)
    return [f + (round(rest * w / s) if s else 0) for f, w in zip(floors, weights, strict=True)]


class RoundSession:
    """Requests to a model, answered in rounds: everything submitted between rounds goes out in one
    ``chat_batch`` call per sampling setting (a server batches or runs them concurrently), then each answer
    is handed back.

    Usage::

        s = model.session(n=1, max_tokens=256, stop=["<end_code>"])
        s.submit(key, messages, prefix=None)  # sampling=Sampling(...): this request's own settings
        for key, texts, info in s.run(refill=None):  # info: gen_s, prompt_tokens, completion_tokens, cut*
            ...  # may s.submit() follow-ups; ``refill()`` is called before each round

    Per-request tokens are the call's totals shared out by characters, time evenly (servers report per call).
    *In-process sessions (``HFSession``) also say which samples their token budget cut off (``cut``, one flag per
    text); here that is unknown and the key is absent.
    """

    def __init__(self, model: Any, sampling: Sampling):
        self.model, self.sampling = model, sampling
        self.pending: list[tuple[Any, Messages, str | None, Sampling]] = []

    def submit(
        self,
        key: Any,
        messages: Messages,
        prefix: str | None = None,
        sampling: Sampling | None = None,
        watch: Any = None,
    ) -> None:
        """Queue a request. ``watch(text so far)`` is for sessions that decode in-process (``HFSession``);
        here an answer arrives whole, so it is not called."""
        self.pending.append((key, list(messages), prefix, sampling or self.sampling))

    def run(self, refill: Any = None) -> Any:
        while True:
            if refill is not None:
                refill()
            if not self.pending:
                return
            batch, self.pending = self.pending, []
            groups: dict[tuple, list] = {}  # one call per sampling setting, in order of first request
            for item in batch:
                s = item[3]
                groups.setdefault(
                    (s.n, s.temperature, s.top_p, s.max_tokens, tuple(s.stop or ())), []
                ).append(item)
            for group in groups.values():
                yield from self._call(group)

    def _call(self, batch: list[tuple[Any, Messages, str | None, Sampling]]) -> Any:
        prefixes = [p for _, _, p, _ in batch]
        p0, c0 = _usage_tokens(self.model)
        t0 = time.perf_counter()
        outs = self.model.chat_batch(
            [m for _, m, _, _ in batch], prefixes=prefixes if any(prefixes) else None, **vars(batch[0][3])
        )
        gen_s = (time.perf_counter() - t0) / len(batch)
        p1, c1 = _usage_tokens(self.model)
        prompt = _shares(p1 - p0, [sum(len(m["content"]) for m in msgs) for _, msgs, _, _ in batch])
        # every completion cost at least one token (the end or stop token), even an empty one
        compl = _shares(c1 - c0, [sum(len(c) for c in cands) for cands in outs], [len(c) for c in outs])
        for (key, _, _, _), texts, pt, ct in zip(batch, outs, prompt, compl, strict=True):
            yield key, texts, {"gen_s": gen_s, "prompt_tokens": pt, "completion_tokens": ct}


# --------------------------------------------------------------------------------------------- transformers


def _default_dtype() -> Any:
    """bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX: 2-4x faster than fp32), else fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


PACKED_SDPA = "sdpa_packed_gqa"


def _register_packed_sdpa() -> str:
    """transformers' SDPA attention, with decoding steps of several rows always on its packed-GQA path.

    When a decoding step needs no mask (rows of equal length: SAG's N copies of one prompt), transformers hands
    grouped-query attention to ``scaled_dot_product_attention(enable_gqa=True)``, whose CPU kernel took 2-2.5x
    the time of the packed path at 16 rows and 1.5x at 8 (Qwen2.5-0.5B, bf16, ~600-token context, transformers
    5.23, torch 2.13). An all-true mask keeps those steps on the packed path; one row keeps ``enable_gqa``, faster there.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def packed(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        if (
            attention_mask is None
            and query.shape[2] == 1
            and query.shape[0] > 1
            and getattr(module, "num_key_value_groups", 1) > 1
        ):
            attention_mask = torch.ones(
                query.shape[0], 1, 1, key.shape[2], dtype=torch.bool, device=query.device
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PACKED_SDPA, packed)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


class HFModel(ChatModel):
    """A transformers causal LM in this process.

    ``name_or_path``: a registry name (``smollm2-135m``), a local model folder, a ``.gguf`` file or a hub id.
    ``max_batch``: most conversations decoding at once (continuous batching, ``agentlib.decoding``); each
    brings its ``n`` samples, which share one encoding of the prompt. Prompts reuse the encoded prefix they share
    with earlier ones (``prime``d system prompt, a conversation's previous turn), kept up to ``prefix_cache_mb``
    (0: off). A reused prefix's keys and values differ slightly (rounding) from a fresh encoding of it, so greedy
    outputs can depend on what ran before in the same process; ``prefix_cache.clear()`` between runs avoids that.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        dtype: Any = None,
        device: str | None = None,
        max_batch: int = 16,
        merge_adapter: bool = False,
        prefix_cache_mb: int = 512,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from agentlib.registry import resolve

        src = resolve(name_or_path)
        kw: dict[str, Any] = {}
        if isinstance(src, Path) and src.suffix == ".gguf":
            src, kw["gguf_file"] = src.parent, src.name
        self.name = str(name_or_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or _default_dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.device == "cpu":
            kw["attn_implementation"] = _register_packed_sdpa()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype, **kw).to(self.device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge_adapter:
                model = model.merge_and_unload()
        self.model = model.eval()
        self.max_batch = max_batch
        self.eos_ids = self._eos_ids()
        from agentlib.decoding import PrefixCache

        self.prefix_cache = PrefixCache(max_bytes=prefix_cache_mb * 2**20)
        self.usage = Usage()

    def _eos_ids(self) -> list[int]:
        ids = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>") if t in vocab)
        return sorted(i for i in ids if i is not None)

    def render(self, messages: Messages, prefix: str | None = None) -> str:
        """The prompt text: the chat template with the assistant header, then ``prefix`` verbatim."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + (prefix or "")

    def tokenize(self, messages: Messages, prefix: str | None = None) -> list[int]:
        return self.tokenizer(self.render(messages, prefix), add_special_tokens=False).input_ids

    def open_session(self, sampling: Sampling) -> HFSession:
        """Continuous batching (``agentlib.decoding``): requests join and leave the running batch step by step."""
        return HFSession(self, sampling)

    def generate(
        self, conversations: list[Messages], prefixes: list[str | None], sampling: Sampling
    ) -> list[list[str]]:
        """Generate for all conversations, ``max_batch`` of them decoding at a time (continuous batching)."""
        s = self.open_session(sampling)
        for i, (m, p) in enumerate(zip(conversations, prefixes, strict=True)):
            s.submit(i, m, p)
        out: list[list[str]] = [[] for _ in conversations]
        for i, texts, _ in s.run():
            out[i] = texts
        return out

    def prime(self, messages: Messages) -> None:
        """Encode ``messages`` once into the prefix cache: prompts that start with them reuse it."""
        import torch

        from agentlib.decoding import encode

        with torch.inference_mode():
            encode(self.model, self.prefix_cache, self.tokenize(messages)[:-1])


class HFSession(RoundSession):
    """``RoundSession``'s interface over ``HFModel``'s continuous batching: a request is answered the step its
    last sample ends, and a follow-up submitted then joins the running batch at the next step. Requests with
    different sampling settings decode in the same batch."""

    def __init__(self, hf: HFModel, sampling: Sampling):
        from agentlib.decoding import Decoder

        self.hf, self.sampling = hf, sampling
        self.decoder = Decoder(
            hf.model,
            hf.tokenizer,
            [*hf.eos_ids, hf.tokenizer.pad_token_id],
            sampling.temperature,
            sampling.top_p,
            sampling.max_tokens,
            sampling.stop,
            hf.max_batch,
            hf.prefix_cache,
            hf.usage,
        )
        self.settings: dict[int, Sampling] = {}  # id(request) -> its sampling

    def submit(
        self,
        key: Any,
        messages: Messages,
        prefix: str | None = None,
        sampling: Sampling | None = None,
        watch: Any = None,
    ) -> None:
        """Queue a request; ``watch(text so far)`` sees its first sample after each decoding step until it
        returns True."""
        s = sampling or self.sampling
        greedy = s.temperature <= 0.0  # greedy samples are identical: decode once, copy
        decode = self.hf.tokenizer.decode
        req = self.decoder.submit(
            key,
            self.hf.tokenize(messages, prefix),
            1 if greedy else s.n,
            watch=(lambda ids: watch(decode(ids, skip_special_tokens=True))) if watch else None,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=s.stop,
        )
        self.settings[id(req)] = s

    def run(self, refill: Any = None) -> Any:
        for req in self.decoder.run(refill):
            s = self.settings.pop(id(req))
            texts = [
                cut_at_stop(
                    self.hf.tokenizer.decode(
                        [t for t in x if t not in self.decoder.eos], skip_special_tokens=True
                    ),
                    s.stop,
                )
                for x in req.samples
            ]
            # a sample cut off by the token budget: it neither ended nor hit a stop string
            cut = [
                len(x) >= req.max_tokens
                and x[-1] not in self.decoder.eos
                and not self.decoder._hit_stop(x, req)
                for x in req.samples
            ]
            copies = s.n if s.temperature <= 0.0 else 1  # greedy: one sample, copied
            info = {
                "gen_s": req.gen_s,
                "prompt_tokens": len(req.ids),
                "completion_tokens": sum(len(x) for x in req.samples),
                "cut": cut * copies,
            }
            yield req.key, texts * copies, info


# --------------------------------------------------------------------------------------------- endpoint pool


class RequestError(RuntimeError):
    """A request the server rejected (4xx): retrying elsewhere would not help."""


class _Retryable(Exception):
    pass


@dataclass
class Endpoint:
    """One server of the pool, with its routing state and counters."""

    url: str  # base URL ending in /v1
    outstanding: int = 0
    healthy: bool = True
    down_until: float = 0.0
    failures: int = 0  # consecutive
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    active_s: float = 0.0  # wall time with at least one request outstanding
    _busy_since: float = 0.0
    dead: asyncio.Event | None = field(default=None, repr=False)

    @property
    def root(self) -> str:
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "active_s": round(self.active_s, 3),
            "tokens_per_s": round(self.completion_tokens / self.active_s, 2) if self.active_s else 0.0,
        }


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def endpoints_from_env() -> list[str]:
    """Base URLs from ``AGENTLIB_ENDPOINTS`` (comma or whitespace separated)."""
    raw = os.environ.get("AGENTLIB_ENDPOINTS", "")
    return [u for u in raw.replace(",", " ").split() if u]


class EndpointPool:
    """Least-outstanding-requests routing over healthy endpoints; failed ones rest and are probed back.

    All methods run on the owning event loop (not thread-safe by design: one loop drives the pool).
    """

    def __init__(
        self,
        urls: Sequence[str],
        client: Any,
        retry_after_s: float = 2.0,
        max_retry_after_s: float = 30.0,
        health_timeout_s: float = 5.0,
    ):
        if not urls:
            raise ValueError("no endpoints: pass base URLs or set AGENTLIB_ENDPOINTS")
        self.endpoints = [Endpoint(_normalize_url(u)) for u in urls]
        for ep in self.endpoints:
            ep.dead = asyncio.Event()
        self.client = client
        self.retry_after_s, self.max_retry_after_s = retry_after_s, max_retry_after_s
        self.health_timeout_s = health_timeout_s
        self._probing: set[str] = set()
        self._changed = asyncio.Event()

    async def healthy(self, ep: Endpoint) -> bool:
        """GET <root>/health (llama.cpp, vLLM), falling back to <base>/models."""
        for url in (ep.root + "/health", ep.url + "/models"):
            try:
                r = await self.client.get(url, timeout=self.health_timeout_s)
            except Exception:
                return False
            if r.status_code == 200:
                return True
            if r.status_code != 404:
                return False
        return False

    async def acquire(self, exclude: Endpoint | None = None) -> Endpoint:
        """The healthy endpoint with the fewest outstanding requests (waits while none is healthy)."""
        while True:
            now = time.monotonic()
            for ep in self.endpoints:
                if not ep.healthy and now >= ep.down_until and ep.url not in self._probing:
                    self._probing.add(ep.url)
                    asyncio.ensure_future(self._probe(ep))
            live = [ep for ep in self.endpoints if ep.healthy]
            if len(live) > 1 and exclude is not None:
                live = [ep for ep in live if ep is not exclude] or live
            if live:
                ep = min(live, key=lambda e: (e.outstanding, e.requests))
                if ep.outstanding == 0:
                    ep._busy_since = time.monotonic()
                ep.outstanding += 1
                return ep
            self._changed.clear()
            wake = min(ep.down_until for ep in self.endpoints) - now
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.05, wake))
            except TimeoutError:
                pass

    def release(self, ep: Endpoint) -> None:
        ep.outstanding -= 1
        if ep.outstanding == 0:
            ep.active_s += time.monotonic() - ep._busy_since

    def succeeded(self, ep: Endpoint, prompt_tokens: int, completion_tokens: int) -> None:
        ep.requests += 1
        ep.failures = 0
        ep.prompt_tokens += prompt_tokens
        ep.completion_tokens += completion_tokens

    def failed(self, ep: Endpoint, count_error: bool = True) -> None:
        """Take ``ep`` out of rotation until ``down_until`` (growing backoff), then probe it."""
        ep.errors += count_error
        ep.failures += 1
        ep.healthy = False
        delay = min(self.retry_after_s * 2 ** (ep.failures - 1), self.max_retry_after_s)
        ep.down_until = time.monotonic() + delay * (0.8 + 0.4 * random.random())

    async def _probe(self, ep: Endpoint) -> None:
        try:
            if await self.healthy(ep):
                ep.healthy = True
                if ep.dead.is_set():
                    ep.dead = asyncio.Event()
                self._changed.set()
            else:
                self.failed(ep, count_error=False)
        finally:
            self._probing.discard(ep.url)

    async def watch(self, interval_s: float, strikes: int = 2) -> None:
        """Health-check busy endpoints every ``interval_s``; after ``strikes`` failed checks in a row the
        endpoint is taken out and its in-flight requests are re-sent elsewhere (a hung or dead server)."""
        missed: dict[str, int] = {}
        while True:
            await asyncio.sleep(interval_s)
            busy = [ep for ep in self.endpoints if ep.healthy and ep.outstanding > 0]
            results = await asyncio.gather(*(self.healthy(ep) for ep in busy))
            for ep, ok in zip(busy, results, strict=True):
                missed[ep.url] = 0 if ok else missed.get(ep.url, 0) + 1
                if missed[ep.url] >= strikes and ep.healthy:
                    self.failed(ep)
                    ep.dead.set()

    def stats(self) -> list[dict[str, Any]]:
        return [ep.stats() for ep in self.endpoints]


# --------------------------------------------------------------------------------------------- OpenAI client


class _LoopThread:
    """An asyncio loop in a daemon thread: sync calls work inside Jupyter, whose loop is already running."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agentlib-openai", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class OpenAIModel(ChatModel):
    """A pool of OpenAI-compatible chat servers used as one model.

    ``endpoints``: base URLs (``http://127.0.0.1:8000/v1``; ``/v1`` is added if missing), default
    ``AGENTLIB_ENDPOINTS``. ``model``: the model every request names (a vLLM LoRA module's name for a LoRA
    student, see ``agentlib.serve.vllm_model``; default: the first from ``/v1/models``).
    ``prefix_style``: ``"auto"`` sends the prefix as a final assistant message with vLLM's
    ``continue_final_message``; llama.cpp prefills it on its own and echoes it, which is stripped.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        health_interval_s: float = 5.0,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.urls = list(endpoints or endpoints_from_env())
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.health_interval_s = health_interval_s
        self.seed = seed
        self.extra_body = extra_body or {}
        self.usage = Usage()
        self._rt: _LoopThread | None = None
        self.pool: EndpointPool | None = None
        self._on_close: list[Any] = []

    # -- lifecycle
    def _runtime(self) -> _LoopThread:
        if self._rt is None:
            self._rt = _LoopThread()
            self._rt.run(self._setup())
        return self._rt

    async def _setup(self) -> None:
        import httpx

        limits = httpx.Limits(
            max_connections=self.max_concurrency + 8, max_keepalive_connections=self.max_concurrency
        )
        headers = {"Authorization": f"Bearer {self.api_key}"}
        self._client = httpx.AsyncClient(limits=limits, headers=headers, timeout=self.timeout_s)
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._inflight, self._busy_since = 0, 0.0
        self.pool = EndpointPool(self.urls, self._client)
        self._watch = asyncio.ensure_future(self.pool.watch(self.health_interval_s))

    def close(self) -> None:
        """Stop the client loop (and any server this model started)."""
        if self._rt is not None:

            async def _shutdown() -> None:
                self._watch.cancel()
                await self._client.aclose()

            self._rt.run(_shutdown())
            self._rt.stop()
            self._rt = None
        for fn in self._on_close:
            fn()
        self._on_close.clear()

    def __enter__(self) -> OpenAIModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Per-endpoint requests, errors, tokens and tokens/s."""
        return self.pool.stats() if self.pool else []

    def endpoint_summary(self) -> str:
        """The run's per-endpoint report, one line each: requests, errors, tokens, tokens/s while busy."""
        return "\n".join(
            f"{s['url']}: {s['requests']} requests, {s['errors']} errors, {s['completion_tokens']} tokens, "
            f"{s['tokens_per_s']:.1f} tokens/s{'' if s['healthy'] else ' (out of the pool)'}"
            for s in self.endpoint_stats()
            if s["requests"] or s["errors"]
        )

    # -- requests
    def generate(
        self, conversations: list[Messages], prefixes: list[str | None], sampling: Sampling
    ) -> list[list[str]]:
        """All conversations concurrently (at most ``max_concurrency`` requests in flight)."""
        return self._runtime().run(self._batch(conversations, prefixes, sampling))

    def prime(self, messages: Messages) -> None:
        """Prefill ``messages`` once (one token generated), before conversations that all start with them.

        Conversations that start together each prefill their shared prefix, since llama.cpp keeps a prompt
        cache per slot; after priming, the one that lands on the primed slot takes it from the cache (the
        teacher's 1.9k-token prompt: ~1 min of prefill on 2 cores). vLLM's prefix caching shares it with all.
        """
        self.chat_batch([messages], max_tokens=1)

    async def achat_batch(
        self, conversations: Sequence[Messages], prefixes: Sequence[str | None] | None = None, **sampling: Any
    ) -> list[list[str]]:
        """``chat_batch`` for callers inside their own event loop (``sampling``: ``Sampling``'s fields)."""
        prefixes = list(prefixes) if prefixes is not None else [None] * len(conversations)
        coro = self._batch(list(conversations), prefixes, Sampling(**sampling))
        fut = asyncio.run_coroutine_threadsafe(coro, self._runtime().loop)
        return await asyncio.wrap_future(fut)

    async def _batch(
        self, conversations: list[Messages], prefixes: list[str | None], sampling: Sampling
    ) -> list[list[str]]:
        if self.model is None:
            self.model = await self._first_model()
        jobs = [self._one(m, p, sampling) for m, p in zip(conversations, prefixes, strict=True)]
        return list(await asyncio.gather(*jobs))

    async def _first_model(self) -> str:
        ep = await self.pool.acquire()
        try:
            r = await self._client.get(ep.url + "/models", timeout=10)
            data = r.json()
            return data["data"][0]["id"] if data.get("data") else data["models"][0]["model"]
        except Exception:
            return "default"
        finally:
            self.pool.release(ep)

    async def _one(self, messages: Messages, prefix: str | None, sampling: Sampling) -> list[str]:
        n, stop = sampling.n, sampling.stop
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            **self.extra_body,
        }
        if stop:
            body["stop"] = list(stop)
        if self.seed is not None:
            body["seed"] = self.seed
        if prefix is not None:
            body["messages"] = [*messages, {"role": "assistant", "content": prefix}]
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        texts: list[str] = []
        while len(texts) < n:  # servers may return fewer choices than asked (or ignore n): ask for the rest
            body["n"] = n - len(texts)
            data = await self._post(body)
            for choice in data["choices"][: n - len(texts)]:
                text = choice["message"].get("content") or ""
                if prefix and "timings" in data and text.startswith(prefix):  # llama.cpp echoes the prefill
                    text = text[len(prefix) :]
                texts.append(cut_at_stop(text, stop))
        return texts

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/completions with retries; a failed endpoint is taken out and the request re-sent.

        ``usage.seconds`` counts wall time with at least one request in flight, so ``usage.tokens_per_s``
        is the throughput of concurrent requests, not a sum of latencies.
        """
        async with self._sem:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1
            try:
                return await self._post_retrying(body)
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self.usage.seconds += time.perf_counter() - self._busy_since

    async def _post_retrying(self, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        ep_prev: Endpoint | None = None
        for attempt in range(self.max_retries + 1):
            ep = await self.pool.acquire(exclude=ep_prev)
            try:
                data = await self._attempt(ep, body)
            except RequestError:
                raise
            except Exception as e:  # connection error, timeout, 5xx, server died mid-request
                last = e
                self.pool.failed(ep)
                ep_prev = ep
                if not any(x.healthy for x in self.pool.endpoints):
                    await asyncio.sleep(self.backoff_s * 2**attempt * (0.5 + random.random()))
                continue
            finally:
                self.pool.release(ep)
            usage = data.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            self.pool.succeeded(ep, pt, ct)
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.cached_tokens += int(
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            )
            self.usage.calls += 1
            return data
        raise ConnectionError(f"request failed after {self.max_retries + 1} attempts: {last!r}")

    async def _attempt(self, ep: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        dead = ep.dead
        post = asyncio.ensure_future(self._client.post(ep.url + "/chat/completions", json=body))
        watch = asyncio.ensure_future(dead.wait())
        try:
            done, _ = await asyncio.wait({post, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if post not in done:  # the health watcher declared this endpoint dead: re-send elsewhere
            post.cancel()
            raise _Retryable(f"{ep.url} went down mid-request")
        r = post.result()
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(f"{ep.url}: HTTP {r.status_code}")
        if r.status_code >= 400:
            raise RequestError(f"{ep.url}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()


# --------------------------------------------------------------------------------------------- factory


def load_model(name_or_path: str | os.PathLike, backend: str = "hf", **kwargs: Any) -> ChatModel:
    """A chat model by name.

    - ``backend="hf"``: ``HFModel(name_or_path, **kwargs)``.
    - ``backend="openai"``: ``OpenAIModel(model=name_or_path, **kwargs)`` (``endpoints=`` or AGENTLIB_ENDPOINTS);
      ``adapter=`` a LoRA folder the servers serve as a module named after the folder: requests name that module.
    - ``backend="vllm"``: ``agentlib.serve.open_vllm(name_or_path, adapter=None, **kwargs)``: vLLM servers from
      AGENTLIB_ENDPOINTS, or started here (``close()`` stops them); requests name the adapter's LoRA module.
    - ``backend="llamacpp"``: starts a local llama.cpp server over the model's GGUF (registry name or file)
      and returns an ``OpenAIModel`` on it; ``close()`` stops the server. Server options: ``n_parallel``,
      ``n_ctx``, ``threads``; ``adapter=`` a peft LoRA folder, converted to a GGUF LoRA the server applies.
    """
    if backend == "hf":
        return HFModel(name_or_path, **kwargs)
    if backend == "openai":
        adapter = kwargs.pop("adapter", None)
        if adapter is not None:
            from agentlib.serve import lora_name

            return OpenAIModel(model=lora_name(adapter), **kwargs)
        return OpenAIModel(model=str(name_or_path), **kwargs)
    if backend == "vllm":
        from agentlib.serve import open_vllm

        return open_vllm(str(name_or_path), kwargs.pop("adapter", None), **kwargs)
    if backend == "llamacpp":
        from agentlib.serve import start_llamacpp

        server_kw = {k: kwargs.pop(k) for k in ("n_parallel", "n_ctx", "threads", "seed") if k in kwargs}
        adapter = kwargs.pop("adapter", None)
        if adapter is not None:
            from agentlib.gguf_lora import lora_to_gguf
            from agentlib.registry import gguf_file

            server_kw["lora"] = lora_to_gguf(adapter, gguf_file(name_or_path))
        server = start_llamacpp(name_or_path, **server_kw)
        # No more requests in flight than slots: the rest wait here in order, not in the server's queue, where
        # their order (and so which slot's prompt cache each one meets) would vary from run to run and change
        # greedy outputs (the teacher's CoT answers differed between two runs with 12 requests on one slot).
        kwargs.setdefault("max_concurrency", server.n_parallel)
        model = OpenAIModel(endpoints=[server.base_url], model=str(name_or_path), **kwargs)
        model._on_close.append(server.stop)
        return model
    raise ValueError(f"unknown backend {backend!r}: use 'hf', 'openai', 'vllm' or 'llamacpp'")
