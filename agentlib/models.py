"""Chat model backends behind one interface: in-process transformers and OpenAI-compatible servers.

Every backend has

    chat(messages, n=1, temperature=0.0, top_p=1.0, max_tokens=512, stop=None, prefix=None) -> list[str]
    chat_batch(conversations, n=1, ..., prefixes=None) -> list[list[str]]

``prefix`` is text forced as the start of the assistant turn; outputs are the continuation only, with stop
strings cut off. ``.usage`` counts prompt/completion tokens and generation seconds.

- ``HFModel``: transformers in this process (bf16 on CPU), batched across conversations with left padding,
  ``n`` samples per prompt, optional peft adapter.
- ``OpenAIModel``: one or more OpenAI-compatible servers (vLLM, llama.cpp, hosted APIs) as one pool:
  bounded concurrency, retries with backoff, least-outstanding routing, health checks, failover.
- ``load_model(name_or_path, backend="hf" | "openai" | "llamacpp")``.
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

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = self.calls = 0
        self.seconds = self.prefill_seconds = 0.0


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class ChatModel:
    """Shared single-conversation form of ``chat_batch``."""

    usage: Usage

    def chat(self, messages: Messages, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_tokens: int = 512, stop: Sequence[str] | None = None, prefix: str | None = None) -> list[str]:
        """``n`` completions of the assistant turn after ``messages`` (continuing ``prefix`` if given)."""
        return self.chat_batch([messages], n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                               stop=stop, prefixes=[prefix])[0]

    def chat_batch(self, conversations: Sequence[Messages], n: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, max_tokens: int = 512, stop: Sequence[str] | None = None,
                   prefixes: Sequence[str | None] | None = None) -> list[list[str]]:
        raise NotImplementedError

    def prime(self, messages: Messages) -> None:
        """Warm a prompt cache with ``messages``, a prefix many following conversations share (no-op here)."""


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
        if (attention_mask is None and query.shape[2] == 1 and query.shape[0] > 1
                and getattr(module, "num_key_value_groups", 1) > 1):
            attention_mask = torch.ones(query.shape[0], 1, 1, key.shape[2], dtype=torch.bool, device=query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PACKED_SDPA, packed)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


class HFModel(ChatModel):
    """A transformers causal LM in this process.

    ``name_or_path``: a registry name (``smollm2-135m``), a local model folder, a ``.gguf`` file or a hub id.
    ``max_batch``: most conversations per ``generate`` call; each brings its ``n`` samples, which share
    one prefill of the prompt (and all conversations share one prefill of their common prefix).
    """

    def __init__(self, name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None,
                 dtype: Any = None, device: str | None = None, max_batch: int = 16, merge_adapter: bool = False):
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

    def chat_batch(self, conversations: Sequence[Messages], n: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, max_tokens: int = 512, stop: Sequence[str] | None = None,
                   prefixes: Sequence[str | None] | None = None) -> list[list[str]]:
        """Generate for all conversations, ``max_batch`` conversations per call, shortest prompts together."""
        prefixes = list(prefixes) if prefixes is not None else [None] * len(conversations)
        prompts = [self.render(m, p) for m, p in zip(conversations, prefixes, strict=True)]
        greedy = temperature <= 0.0
        k = 1 if greedy else n  # greedy samples are identical: generate once, copy
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        out: list[list[str]] = [[] for _ in prompts]
        for s in range(0, len(order), self.max_batch):
            idx = order[s:s + self.max_batch]
            texts = self._generate([ids[i] for i in idx], k, temperature, top_p, max_tokens, stop)
            for j, i in enumerate(idx):
                samples = texts[j * k:(j + 1) * k]
                out[i] = samples * n if greedy else samples
        return out

    def _prefill(self, ids: list[list[int]], k: int) -> tuple[Any, Any, Any]:
        """Encode every prompt but its last token once; return (input_ids, attention_mask, cache) for ``k``
        samples each.

        The prefix common to all prompts (the system prompt) is computed once, then copied per prompt; the
        rest of each prompt is computed once, then the cache is copied ``k`` times. Row layout: common
        prefix | left-padded own part | last token (the mask hides the padding, positions skip it), so
        ``generate`` only computes the last token and the new ones.
        """
        import torch
        from transformers import DynamicCache

        lp = 0
        shortest = min(len(x) for x in ids)
        while lp < shortest - 1 and all(x[lp] == ids[0][lp] for x in ids):
            lp += 1
        body = [x[lp:-1] for x in ids]
        width = max(len(b) for b in body)
        pad = self.tokenizer.pad_token_id
        rows = [ids[0][:lp] + [pad] * (width - len(b)) + b + x[-1:] for b, x in zip(body, ids, strict=True)]
        mask = [[1] * lp + [0] * (width - len(b)) + [1] * (len(b) + 1) for b in body]
        input_ids = torch.tensor(rows, device=self.device)
        attention_mask = torch.tensor(mask, device=self.device)
        cache = DynamicCache(config=self.model.config)
        if lp:
            self.model(input_ids=input_ids[:1, :lp], past_key_values=cache, use_cache=True, logits_to_keep=1)
            if len(ids) > 1:
                cache.batch_repeat_interleave(len(ids))
        if width:
            end = lp + width
            pos = (attention_mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, lp:]
            self.model(input_ids=input_ids[:, lp:end], attention_mask=attention_mask[:, :end], position_ids=pos,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        if k > 1:
            cache.batch_repeat_interleave(k)
            input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
        return input_ids, attention_mask, cache

    def _generate(self, ids: list[list[int]], k: int, temperature: float, top_p: float, max_tokens: int,
                  stop: Sequence[str] | None) -> list[str]:
        """``k`` completions per prompt (token ids), flat: prompt 0's samples first."""
        import torch

        t0 = time.perf_counter()
        # top_k=0: nucleus sampling only, as in the OpenAI API (transformers would add top_k=50)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        extra = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        with torch.inference_mode():
            input_ids, attention_mask, cache = self._prefill(ids, k)
            self.usage.prefill_seconds += time.perf_counter() - t0
            gen = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                      max_new_tokens=max_tokens, eos_token_id=self.eos_ids,
                                      pad_token_id=self.tokenizer.pad_token_id, **sampling, **extra)
        new = gen[:, input_ids.shape[1]:]
        ends = {*self.eos_ids, self.tokenizer.pad_token_id}
        texts = []
        for row in new.tolist():
            out = []
            for t in row:
                if t in ends:
                    break
                out.append(t)
            self.usage.completion_tokens += len(out) + (len(out) < len(row))
            texts.append(cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), stop))
        self.usage.prompt_tokens += sum(len(x) for x in ids)
        self.usage.seconds += time.perf_counter() - t0
        self.usage.calls += 1
        return texts


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
        return {"url": self.url, "healthy": self.healthy, "requests": self.requests, "errors": self.errors,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "active_s": round(self.active_s, 3),
                "tokens_per_s": round(self.completion_tokens / self.active_s, 2) if self.active_s else 0.0}


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

    def __init__(self, urls: Sequence[str], client: Any, retry_after_s: float = 2.0, max_retry_after_s: float = 30.0,
                 health_timeout_s: float = 5.0):
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
    ``AGENTLIB_ENDPOINTS``. ``model``: the served model name (default: the first from ``/v1/models``).
    ``prefix_style``: ``"auto"`` sends the prefix as a final assistant message with vLLM's
    ``continue_final_message``; llama.cpp prefills it on its own and echoes it, which is stripped.
    """

    def __init__(self, endpoints: Sequence[str] | str | None = None, model: str | None = None,
                 api_key: str | None = None, max_concurrency: int = 16, timeout_s: float = 600.0,
                 max_retries: int = 6, backoff_s: float = 0.5, health_interval_s: float = 5.0,
                 seed: int | None = None, extra_body: dict[str, Any] | None = None):
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

        limits = httpx.Limits(max_connections=self.max_concurrency + 8, max_keepalive_connections=self.max_concurrency)
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

    # -- requests
    def chat_batch(self, conversations: Sequence[Messages], n: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, max_tokens: int = 512, stop: Sequence[str] | None = None,
                   prefixes: Sequence[str | None] | None = None) -> list[list[str]]:
        """All conversations concurrently (at most ``max_concurrency`` requests in flight)."""
        return self._runtime().run(self._batch(conversations, n, temperature, top_p, max_tokens, stop, prefixes))

    def prime(self, messages: Messages) -> None:
        """Prefill ``messages`` once (one token generated), before conversations that all start with them.

        Conversations that start together each prefill their shared prefix, since llama.cpp keeps a prompt
        cache per slot; after priming, the one that lands on the primed slot takes it from the cache (the
        teacher's 1.9k-token prompt: ~1 min of prefill on 2 cores). vLLM's prefix caching shares it with all.
        """
        self.chat_batch([messages], max_tokens=1)

    async def achat_batch(self, *args: Any, **kwargs: Any) -> list[list[str]]:
        """``chat_batch`` for callers inside their own event loop."""
        rt = self._runtime()
        fut = asyncio.run_coroutine_threadsafe(self._batch(*args, **kwargs), rt.loop)
        return await asyncio.wrap_future(fut)

    async def _batch(self, conversations: Sequence[Messages], n: int = 1, temperature: float = 0.0,
                     top_p: float = 1.0, max_tokens: int = 512, stop: Sequence[str] | None = None,
                     prefixes: Sequence[str | None] | None = None) -> list[list[str]]:
        prefixes = list(prefixes) if prefixes is not None else [None] * len(conversations)
        if self.model is None:
            self.model = await self._first_model()
        jobs = [self._one(m, p, n, temperature, top_p, max_tokens, stop)
                for m, p in zip(conversations, prefixes, strict=True)]
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

    async def _one(self, messages: Messages, prefix: str | None, n: int, temperature: float, top_p: float,
                   max_tokens: int, stop: Sequence[str] | None) -> list[str]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p, **self.extra_body}
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
                    text = text[len(prefix):]
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
                    await asyncio.sleep(self.backoff_s * 2 ** attempt * (0.5 + random.random()))
                continue
            finally:
                self.pool.release(ep)
            usage = data.get("usage") or {}
            pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            self.pool.succeeded(ep, pt, ct)
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
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
    - ``backend="openai"``: ``OpenAIModel(model=name_or_path, **kwargs)`` (``endpoints=`` or AGENTLIB_ENDPOINTS).
    - ``backend="llamacpp"``: starts a local llama.cpp server over the model's GGUF (registry name or file)
      and returns an ``OpenAIModel`` on it; ``close()`` stops the server. Server options: ``n_parallel``,
      ``n_ctx``, ``threads``; ``adapter=`` a peft LoRA folder, converted to a GGUF LoRA the server applies.
    """
    if backend == "hf":
        return HFModel(name_or_path, **kwargs)
    if backend == "openai":
        return OpenAIModel(model=str(name_or_path), **kwargs)
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
    raise ValueError(f"unknown backend {backend!r}: use 'hf', 'openai' or 'llamacpp'")
