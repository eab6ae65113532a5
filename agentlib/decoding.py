"""Continuous batching for an in-process transformers model (``HFModel``): one KV cache whose rows come and go.

Static batching (``generate`` on a batch) decodes every row until the longest one ends, and takes no new work
until then: in an agent run most rows are idle padding by the end of a call (short actions wait for the one that
rambles to its token budget). Here a row leaves the batch the step it ends (end token, stop string or budget),
and a waiting request is encoded and joins at once, as in vLLM. The agent feeds it: a trajectory whose action
has run comes back with its next turn while the others are still decoding.

Each request's prompt is encoded on its own (no padding to the longest prompt), reusing the keys and values of
the longest prefix it shares with an earlier sequence (``PrefixCache``: the primed system prompt, and each
conversation's previous turn), then copied once per sample into the batch's cache (``_Slots``): one slot per
row in a buffer that grows when it must, each row at its own length (the attention mask hides what lies past
it). A row that joins is written into the next free slot and a row that leaves is replaced by the last one, so
no step copies the other rows' keys and values: with 32 long agent conversations (~4k tokens each, ~3.7 GB of
cache for the 1.5B teacher) rebuilding the whole cache at every join and leave took a fifth of the time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = [
    "KV",
    "new_cache",
    "cache_kv",
    "PrefixCache",
    "sample",
    "Request",
    "Decoder",
    "encode",
]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [rows, heads, tokens, head_dim]


class _Layer(DynamicLayer):
    """A cache layer that appends into spare room instead of concatenating the whole cache at every step."""

    def assign(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64) -> None:
        b, h, t, d = keys.shape
        self._k = keys.new_empty(b, h, t + spare, d)
        self._v = values.new_empty(b, h, t + spare, values.shape[-1])
        self._k[:, :, :t], self._v[:, :, :t] = keys, values
        self.keys, self.values = self._k[:, :, :t], self._v[:, :, :t]
        self._view = self.keys
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys.numel() == 0:
            self.assign(key_states, value_states)
            return self.keys, self.values
        t, q = self.keys.shape[-2], key_states.shape[-2]
        if self.keys is not self._view or t + q > self._k.shape[-2]:  # replaced from outside, or full
            self.assign(
                torch.cat([self.keys, key_states], -2),
                torch.cat([self.values, value_states], -2),
                spare=max(64, t // 4),
            )
            return self.keys, self.values
        self._k[:, :, t : t + q], self._v[:, :, t : t + q] = key_states, value_states
        self.keys, self.values = self._k[:, :, : t + q], self._v[:, :, : t + q]
        self._view = self.keys
        return self.keys, self.values


class _Slots(DynamicLayer):
    """One layer of the batch's cache: row ``i`` lives in slot ``i`` of a ``[rows, heads, tokens, head_dim]``
    buffer with room to spare, its tokens at columns ``0 .. lens[i] - 1``.

    A decoding step writes each row's new keys and values at its own column ``lens[i]`` and attends over the
    first ``width + 1`` columns (``width``: the longest row), the columns past a row's end masked out. The
    decoder sets ``lens`` and ``width`` before each step (:meth:`Decoder._step`). ``n``: the rows in use;
    ``used``: the columns any of them may fill.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n = self.used = self.width = 0
        self.lens: torch.Tensor | None = None
        self.kb = self.vb = None

    def reserve(self, rows: int, tokens: int, like: torch.Tensor) -> None:
        """Room for ``rows`` rows of ``tokens`` tokens. The buffer grows with room to spare, so that growing is
        rare, and shrinks once it is more than twice what is needed (long conversations have left)."""
        if self.kb is None:
            old_rows = old_tokens = 0
        else:
            old_rows, old_tokens = self.kb.shape[0], self.kb.shape[2]
            fits = rows <= old_rows and tokens <= old_tokens
            if fits and old_rows * old_tokens <= 2 * (rows + 8) * (tokens + 512):
                return
            if fits:  # shrink to what the rows in it need
                old_rows = old_tokens = 0
                rows, tokens = max(rows, self.n), max(tokens, self.used)
        r = old_rows if rows <= old_rows else max(rows, old_rows + old_rows // 4 + 4)
        t = old_tokens if tokens <= old_tokens else max(tokens, old_tokens + old_tokens // 8) + 64
        # zeros: a masked column still enters the product (NaN from uninitialised memory would survive the mask)
        kb = like.new_zeros(r, like.shape[1], t, like.shape[3])
        vb = like.new_zeros(r, like.shape[1], t, like.shape[3])
        if self.kb is not None and self.n:
            kb[: self.n, :, : self.used] = self.kb[: self.n, :, : self.used]
            vb[: self.n, :, : self.used] = self.vb[: self.n, :, : self.used]
        self.kb, self.vb = kb, vb
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True

    def put(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a row's keys and values (``[k, heads, tokens, head_dim]``) into slots ``slot .. slot + k - 1``."""
        k, t = keys.shape[0], keys.shape[2]
        self.kb[slot : slot + k, :, :t] = keys
        self.vb[slot : slot + k, :, :t] = values
        self.n, self.used = max(self.n, slot + k), max(self.used, t)

    def move(self, dst: list[int], src: list[int], width: int) -> None:
        """Copy rows ``src`` into slots ``dst`` (their first ``width`` columns)."""
        if dst:
            d, s = torch.tensor(dst, device=self.kb.device), torch.tensor(src, device=self.kb.device)
            self.kb[d, :, :width] = self.kb[s, :, :width]
            self.vb[d, :, :width] = self.vb[s, :, :width]

    def row(self, i: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kb[i : i + 1, :, :length], self.vb[i : i + 1, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[2] != 1:
            raise ValueError("the batch's cache takes one token per row and step")
        rows = torch.arange(self.n, device=self.kb.device)
        self.kb[rows, :, self.lens] = key_states[:, :, 0]
        self.vb[rows, :, self.lens] = value_states[:, :, 0]
        self.used = max(self.used, self.width + 1)
        return self.kb[: self.n, :, : self.width + 1], self.vb[: self.n, :, : self.width + 1]

    def get_seq_length(self) -> int:
        return self.width


def new_cache(n_layers: int, kv: KV | None = None) -> Cache:
    """A cache of ``_Layer``s, holding ``kv`` if given."""
    cache = Cache(layers=[_Layer() for _ in range(n_layers)])
    for layer, (k, v) in zip(cache.layers, kv or [], strict=False):
        layer.assign(k, v)
    return cache


def cache_kv(cache: Cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


class PrefixCache:
    """Keys and values of earlier token sequences (one row each), found by the longest common token prefix.

    Least recently used entries go first once the entries hold more than ``max_bytes`` (0: nothing is kept).
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(kv: KV) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def lookup(self, ids: Sequence[int]) -> tuple[int, KV | None]:
        """(n, kv[:n]) for the entry sharing the longest prefix with ``ids`` (n = 0, None when none does)."""
        best, best_n = None, 0
        for key in self.entries:
            n = min(len(key), len(ids))
            if n <= best_n or key[0] != ids[0]:
                continue
            m = 0
            while m < n and key[m] == ids[m]:
                m += 1
            if m > best_n:
                best, best_n = key, m
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        return best_n, [(k[:, :, :best_n], v[:, :, :best_n]) for k, v in self.entries[best]]

    def add(self, ids: Sequence[int], kv: KV) -> None:
        """Store ``kv`` (one row, ``len(ids)`` tokens); entries that are prefixes of ``ids`` are dropped."""
        key = tuple(ids)
        if not key or self.max_bytes <= 0:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        for old in [k for k in self.entries if len(k) < len(key) and key[: len(k)] == k]:
            self.nbytes -= self._size(self.entries.pop(old))
        kv = [
            (k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format))
            for k, v in kv
        ]  # copies: a view would keep the whole batch's cache alive
        self.entries[key] = kv
        self.nbytes += self._size(kv)
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            self.nbytes -= self._size(self.entries.popitem(last=False)[1])

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: argmax when ``temperature <= 0``, else nucleus sampling (no top-k), as the OpenAI API."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@dataclass(eq=False)
class Request:
    """A prompt (token ids) and its ``k`` samples; filled in as it decodes."""

    key: Any
    ids: list[int]
    k: int
    samples: list[list[int]] = field(default_factory=list)
    ended: int = 0
    gen_s: float = 0.0  # its own prompt encoding plus its share of every decoding step it was in
    cached: int = 0  # prompt tokens taken from the prefix cache
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    tail: int = 0  # tokens decoded to look for a stop string
    watch: Any = None  # called with sample 0's tokens after each step it goes on, until it returns True


@dataclass
class _Row:
    req: Request
    sample: int
    length: int  # tokens in the cache for this row (the last token is not in it yet)


class Decoder:
    """Continuous batching over ``model`` (a transformers causal LM): ``submit`` requests, iterate ``run``.

    ``temperature``, ``top_p``, ``max_tokens`` and ``stop`` are the defaults; a request may bring its own, so
    requests of different runs (a greedy agent step, a sampled chain-of-thought) decode in one batch.

    ``run`` yields each request as soon as all its samples have ended; the consumer may ``submit`` more inside the
    loop (they join at the next step). ``refill`` (if given) is called whenever a request slot is free, so the
    consumer can submit just in time. At most ``max_requests`` requests decode at once.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_ids: Sequence[int],
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: Sequence[str] | None,
        max_requests: int,
        prefix_cache: PrefixCache,
        usage: Any = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.eos = set(eos_ids)
        self.defaults = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop)
        self.max_requests = max_requests
        self.prefix_cache = prefix_cache
        self.usage = usage
        self.pending: list[Request] = []
        self.rows: list[_Row] = []  # row i is slot i of every layer of ``cache``
        n_layers = model.config.get_text_config().num_hidden_layers
        self.cache = Cache(layers=[_Slots() for _ in range(n_layers)])
        self.last: torch.Tensor | None = None  # [rows] each row's next input token

    # -- queue
    def submit(self, key: Any, ids: list[int], k: int = 1, watch: Any = None, **sampling: Any) -> Request:
        """Queue a prompt for ``k`` samples; ``sampling`` (temperature, top_p, max_tokens, stop) overrides the
        decoder's defaults for this request. ``watch(tokens)`` sees sample 0 as it grows (a consumer can act
        on the start of an answer before it ends) until it returns True."""
        if len(ids) < 2:
            raise ValueError("a prompt needs at least 2 tokens (a chat template gives many more)")
        unknown = set(sampling) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown sampling arguments {sorted(unknown)}")
        s = {**self.defaults, **{k_: v for k_, v in sampling.items() if v is not None}}
        stop = [x for x in (s["stop"] or []) if x]
        # tokens decoded to look for a stop string: every token but a special one is at least one byte
        tail = max([len(x.encode()) for x in stop] + [0]) + 2
        req = Request(
            key,
            list(ids),
            k,
            temperature=s["temperature"],
            top_p=s["top_p"],
            max_tokens=s["max_tokens"],
            stop=stop,
            tail=tail,
            watch=watch,
        )
        self.pending.append(req)
        return req

    def _active(self) -> int:
        return len({id(r.req) for r in self.rows})

    # -- main loop
    def run(self, refill: Callable[[], None] | None = None) -> Iterator[Request]:
        """Decode until nothing is pending or running, yielding each finished request."""
        while True:
            if refill is not None:
                refill()
            while self.pending and self._active() < self.max_requests:
                self._admit(self.pending.pop(0))
            if not self.rows:
                return
            yield from self._step()

    @torch.inference_mode()
    def _admit(self, req: Request) -> None:
        """Encode the prompt but its last token (that is the first step's input) and write it into ``k`` new
        slots. Its time (encoding, and the copy) is charged to ``req``."""
        t0 = time.perf_counter()
        n = len(req.ids) - 1
        kv, req.cached = encode(self.model, self.prefix_cache, req.ids[:-1])
        slot = len(self.rows)
        for layer, (k, v) in zip(self.cache.layers, kv, strict=True):
            layer.reserve(slot + req.k, n + 1, k)
            layer.put(slot, k.expand(req.k, -1, -1, -1), v.expand(req.k, -1, -1, -1))
        first = torch.full((req.k,), req.ids[-1], dtype=torch.long, device=self.model.device)
        self.last = first if self.last is None else torch.cat([self.last, first])
        req.samples = [[] for _ in range(req.k)]
        self.rows += [_Row(req, s, n) for s in range(req.k)]
        dt = time.perf_counter() - t0
        req.gen_s += dt
        if self.usage is not None:
            self.usage.prefill_seconds += dt
            self.usage.seconds += dt
            self.usage.prompt_tokens += len(req.ids)
            self.usage.cached_tokens += req.cached

    @torch.inference_mode()
    def _step(self) -> list[Request]:
        """One token for every row; rows that end leave; returns the requests whose samples have all ended."""
        t0 = time.perf_counter()
        dev = self.model.device
        lens = torch.tensor([r.length for r in self.rows], device=dev)  # where each row's new token goes
        width = int(lens.max())
        for layer in self.cache.layers:
            layer.reserve(len(self.rows), width + 1, layer.kb)
            layer.lens, layer.width = lens, width
        mask = (torch.arange(width + 1, device=dev)[None] <= lens[:, None]).long()
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=mask,
            position_ids=lens[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        tokens = self._sample(out.logits[:, -1, :])
        keep, finished = [], []
        for i, (row, tok) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            row.length += 1
            gen = row.req.samples[row.sample]
            gen.append(tok)
            if tok in self.eos or len(gen) >= row.req.max_tokens or self._hit_stop(gen, row.req):
                row.req.ended += 1
                if row.req.ended == row.req.k:
                    finished.append(row.req)
                    if row.req.k == 1:  # its next turn starts with this prompt and answer
                        self._remember(i, row)
            else:
                keep.append(i)
                if row.sample == 0 and row.req.watch is not None and row.req.watch(gen):
                    row.req.watch = None
        reqs = {id(r.req): r.req for r in self.rows}
        n_rows = len(self.rows)
        if len(keep) < n_rows:
            self._keep(keep, tokens)
        else:
            self.last = tokens
        dt = time.perf_counter() - t0
        for req in reqs.values():
            req.gen_s += dt / len(reqs)
        if self.usage is not None:
            self.usage.seconds += dt
            self.usage.completion_tokens += n_rows
            self.usage.calls += len(finished)
        return finished

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row, each with its request's temperature and top-p (rows grouped by them)."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault((row.req.temperature, row.req.top_p), []).append(i)
        if len(groups) == 1:
            return sample(logits, *next(iter(groups)))
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for (temperature, top_p), rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            tokens[idx] = sample(logits[idx], temperature, top_p)
        return tokens

    def _hit_stop(self, gen: list[int], req: Request) -> bool:
        if not req.stop:
            return False
        text = self.tokenizer.decode(gen[-req.tail :], skip_special_tokens=False)
        return any(s in text for s in req.stop)

    def _keep(self, keep: list[int], tokens: torch.Tensor) -> None:
        """Drop ended rows: the rows kept past the new end move into the slots freed below it."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(len(self.rows)))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        order = order[:n]
        width = max((self.rows[i].length for i in movers), default=0)
        used = max((self.rows[i].length for i in keep), default=0)
        for layer in self.cache.layers:
            layer.move(holes, movers, width)
            layer.n, layer.used = n, used
        self.rows = [self.rows[i] for i in order]
        self.last = tokens[torch.tensor(order, device=tokens.device)] if n else None

    def _remember(self, i: int, row: _Row) -> None:
        """Row ``i``'s tokens in the cache (its prompt, and its answer but the last token) to the prefix cache."""
        ids = row.req.ids + row.req.samples[0][:-1]
        self.prefix_cache.add(ids, [layer.row(i, row.length) for layer in self.cache.layers])


def encode(model: Any, prefix_cache: PrefixCache, ids: list[int]) -> tuple[KV, int]:
    """Keys and values of ``ids`` (one row), computing only what follows the longest cached prefix; the
    result goes to the cache. Returns (kv, tokens taken from the cache)."""
    n, kv = prefix_cache.lookup(ids)
    if n == len(ids) and kv is not None:
        return kv, n
    cache = new_cache(model.config.num_hidden_layers, kv)
    rest = torch.tensor([ids[n:]], device=model.device)
    model(
        input_ids=rest,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
        position_ids=torch.arange(n, len(ids), device=model.device)[None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    kv = cache_kv(cache)
    prefix_cache.add(ids, kv)
    return kv, n
