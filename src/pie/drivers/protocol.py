"""The scheduler-to-driver contract: one batched forward pass as a struct of arrays.

Everything here is plain numpy on the host, importable and testable without a GPU,
and serializable as-is for the dev driver's subprocess channel.

Layout of one batch of R requests, T tokens, O output rows:

    token_ids[T], positions[T]          tokens of all requests, concatenated
    qo_indptr[R+1]                      request r owns tokens qo_indptr[r]:qo_indptr[r+1]
    kv_page_indices[P]                  request r's KV pages, in order:
    kv_page_indptr[R+1]                   kv_page_indices[kv_page_indptr[r]:kv_page_indptr[r+1]]
    kv_last_page_len[R]                 fill of r's last page *after* this pass appends (1..page_size)

So request r's KV length after the pass is
    kv_len[r] = (num_pages_r - 1) * page_size + kv_last_page_len[r]
and its n_r new tokens are written to KV slots kv_len[r] - n_r .. kv_len[r] - 1.
Positions (for RoPE) are independent of slots: the inferlet chooses them.

Attention is causal over slots unless `mask` is given. A mask covers every request:
request r's rows are mask[mask_indptr[r]:mask_indptr[r+1]] reshaped to [n_r, kv_len[r]]
(row i = new token i, column j = KV slot j, True = may attend).

Hybrid models (recurrent layers, Qwen 3.5): state_slots[R] names each request's recurrent-state slot; a
request whose first new token is at KV slot 0 starts from a zero state, every other continues the slot's
state, which the pass updates in place. Such models take no mask, and a request's positions must be
consecutive (the recurrent layers see tokens in order, whatever their positions).

Outputs: output_indices[O] are global token rows (0..T-1) whose outputs are wanted;
each has its own sampler (temperature 0 = argmax) and optional extras.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from pie.errors import PieError

PROTOCOL_VERSION = (
    3  # 2: PageOps, Capabilities.num_swap_slots / page_nbytes / kv_fingerprint; 3: prev_token_rows
)


class BatchError(PieError, ValueError):
    """A ForwardBatch or PageOps that breaks the contract; the message says which field and why."""


def _i32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int32)


@dataclass
class ForwardBatch:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    qo_indptr: np.ndarray  # [R+1] int32
    kv_page_indices: np.ndarray  # [P] int32
    kv_page_indptr: np.ndarray  # [R+1] int32
    kv_last_page_len: np.ndarray  # [R] int32
    output_indices: np.ndarray  # [O] int32, global token rows
    temperature: np.ndarray  # [O] float32; 0 means argmax
    top_k: np.ndarray  # [O] int32; 0 means off
    top_p: np.ndarray  # [O] float32; 1.0 means off
    min_p: np.ndarray  # [O] float32; 0.0 means off
    seed: np.ndarray  # [O] int64; -1 means unseeded
    dist_k: np.ndarray  # [O] int32; >0 returns the top-k distribution of that row
    return_logits: np.ndarray  # [O] bool; True returns the row's full logits
    return_logprobs: bool = False  # log-prob of each sampled token and entropy of each row
    mask: np.ndarray | None = None  # flat bool, see module docstring
    mask_indptr: np.ndarray | None = None  # [R+1] int64
    # [T] int32 or None: >= 0 takes that token from the sampled tokens of the previous forward pass this
    # driver ran (output row index), on the device: lets the runtime queue a generation's next step before
    # the previous one has returned. -1 uses token_ids. A row past the previous result feeds token 0.
    prev_token_rows: np.ndarray | None = None
    # [R] int32 or None: each request's recurrent-state slot (models with recurrent layers; see the module
    # docstring). Ignored by models without them.
    state_slots: np.ndarray | None = None

    # ---- derived sizes -------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_requests(self) -> int:
        return int(self.qo_indptr.shape[0]) - 1

    @property
    def num_outputs(self) -> int:
        return int(self.output_indices.shape[0])

    def kv_lens(self, page_size: int) -> np.ndarray:
        """[R] int32 KV length of each request after this pass."""
        num_pages = np.diff(self.kv_page_indptr)
        return _i32((num_pages - 1) * page_size + self.kv_last_page_len)

    def qo_lens(self) -> np.ndarray:
        return _i32(np.diff(self.qo_indptr))

    # ---- checks ---------------------------------------------------------
    def validate(self, page_size: int, num_pages: int, vocab_size: int | None = None) -> None:
        """Raise BatchError if the batch breaks the contract. Cheap (vectorized)."""
        T, R, O = self.num_tokens, self.num_requests, self.num_outputs  # noqa: E741
        if R < 1:
            raise BatchError("batch has no requests")
        if self.positions.shape != (T,):
            raise BatchError(f"positions has shape {self.positions.shape}, expected ({T},)")
        if self.kv_page_indptr.shape != (R + 1,) or self.kv_last_page_len.shape != (R,):
            raise BatchError("kv_page_indptr must be [R+1] and kv_last_page_len [R]")
        if self.qo_indptr[0] != 0 or self.qo_indptr[-1] != T or np.any(np.diff(self.qo_indptr) < 1):
            raise BatchError("qo_indptr must start at 0, end at num_tokens and give each request >= 1 token")
        npages = np.diff(self.kv_page_indptr)
        if self.kv_page_indptr[0] != 0 or self.kv_page_indptr[-1] != self.kv_page_indices.shape[0]:
            raise BatchError("kv_page_indptr must start at 0 and end at len(kv_page_indices)")
        if np.any(npages < 1):
            raise BatchError("every request needs at least one KV page")
        if np.any(self.kv_last_page_len < 1) or np.any(self.kv_last_page_len > page_size):
            raise BatchError(f"kv_last_page_len must be in 1..{page_size}")
        if self.kv_page_indices.size and (
            self.kv_page_indices.min() < 0 or self.kv_page_indices.max() >= num_pages
        ):
            raise BatchError(f"kv_page_indices out of range 0..{num_pages - 1}")
        if np.any(self.kv_lens(page_size) < self.qo_lens()):
            raise BatchError("a request has more new tokens than KV slots")
        if vocab_size is not None and T and (self.token_ids.min() < 0 or self.token_ids.max() >= vocab_size):
            raise BatchError(f"token id out of range 0..{vocab_size - 1}")
        if O and (self.output_indices.min() < 0 or self.output_indices.max() >= T):
            raise BatchError("output_indices out of range")
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "dist_k", "return_logits"):
            if getattr(self, name).shape != (O,):
                raise BatchError(f"{name} must have one entry per output row ({O})")
        if (self.mask is None) != (self.mask_indptr is None):
            raise BatchError("mask and mask_indptr come together")
        if self.mask is not None:
            sizes = self.qo_lens().astype(np.int64) * self.kv_lens(page_size)
            expect = np.concatenate([[0], np.cumsum(sizes)])
            if self.mask_indptr.shape != (R + 1,) or np.any(self.mask_indptr != expect):
                raise BatchError("mask_indptr must delimit [n_r, kv_len_r] blocks per request")
            if self.mask.shape != (int(expect[-1]),):
                raise BatchError("mask length does not match mask_indptr")
        if self.prev_token_rows is not None and self.prev_token_rows.shape != (T,):
            raise BatchError(f"prev_token_rows must have one entry per token ({T})")
        if self.state_slots is not None and self.state_slots.shape != (R,):
            raise BatchError(f"state_slots must have one entry per request ({R})")

    # ---- (de)serialization for the dev driver's channel ------------------
    def to_wire(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = _arr_to_wire(v) if isinstance(v, np.ndarray) else v
        return out

    @classmethod
    def from_wire(cls, d: dict) -> ForwardBatch:
        return cls(**{k: _arr_from_wire(v) if isinstance(v, dict) else v for k, v in d.items()})


@dataclass
class ForwardResult:
    tokens: np.ndarray  # [O] int64 sampled token per output row
    logprobs: np.ndarray | None = None  # [O] float32, log p(sampled token) at temperature 1
    entropies: np.ndarray | None = None  # [O] float32, entropy of the row's distribution (nats)
    logits: np.ndarray | None = None  # [L, V] float32, rows with return_logits, in output order
    dist_ids: np.ndarray | None = None  # [O, kmax] int64, top-k token ids, -1 padded
    dist_probs: np.ndarray | None = None  # [O, kmax] float32, their probabilities, 0 padded

    def to_wire(self) -> dict:
        return {f.name: _arr_to_wire(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_wire(cls, d: dict) -> ForwardResult:
        return cls(**{k: _arr_from_wire(v) for k, v in d.items()})


def _pairs() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int32)


def _ids() -> np.ndarray:
    return np.zeros(0, dtype=np.int32)


@dataclass
class PageOps:
    """KV page movements, applied by the driver in this order, serialized with forward passes in
    submission order (a forward submitted after a PageOps sees its effect; one submitted before does not):

    1. swap_out  [S,2] int32 rows (device page, host slot): copy device page -> host swap slot
    2. copy      [C,2] int32 rows (src page, dst page): device -> device, every layer, K and V
    3. swap_in   [S,2] int32 rows (host slot, device page)
    4. write     [W] int32 device pages, filled from write_data [W, page_nbytes] uint8 (raw bytes of the
                 cache dtype)
    5. read      [R] int32 device pages whose raw bytes come back in PageOpsResult.data [R, page_nbytes] uint8

    Recurrent-state slots (hybrid models; Capabilities.num_state_slots, state_nbytes), after the pages:
    6. state_copy  [C, 2] int32 rows (src slot, dst slot), all sources read before any destination is written
    7. state_write [W] int32 slots, filled from state_write_data [W, state_nbytes] uint8
    8. state_read  [R] int32 slots whose raw bytes come back in PageOpsResult.state_data

    A page's raw bytes are the concatenation over layers (layer 0 first) of that layer's page
    [2 (K, V), page_size, num_kv_heads, head_dim] in the cache dtype; they are only meaningful to a driver
    whose Capabilities.kv_fingerprint is the same. Within one step every source is read before any
    destination of that step is written (so a copy may name a page both as a source and a destination);
    destinations within a step must be distinct (two writers of one page would race).
    """

    swap_out: np.ndarray = field(default_factory=_pairs)  # [S, 2] int32 (device page, host slot)
    copy: np.ndarray = field(default_factory=_pairs)  # [C, 2] int32 (src page, dst page)
    swap_in: np.ndarray = field(default_factory=_pairs)  # [S, 2] int32 (host slot, device page)
    write: np.ndarray = field(default_factory=_ids)  # [W] int32 device pages
    read: np.ndarray = field(default_factory=_ids)  # [R] int32 device pages
    write_data: np.ndarray | None = None  # [W, page_nbytes] uint8
    state_copy: np.ndarray = field(default_factory=_pairs)  # [C, 2] int32 (src slot, dst slot)
    state_write: np.ndarray = field(default_factory=_ids)  # [W] int32 state slots
    state_read: np.ndarray = field(default_factory=_ids)  # [R] int32 state slots
    state_write_data: np.ndarray | None = None  # [W, state_nbytes] uint8

    @property
    def has_state_ops(self) -> bool:
        return bool(len(self.state_copy) or len(self.state_write) or len(self.state_read))

    @property
    def is_empty(self) -> bool:
        return not (
            len(self.swap_out)
            or len(self.copy)
            or len(self.swap_in)
            or len(self.write)
            or len(self.read)
            or self.has_state_ops
        )

    def validate(
        self,
        num_pages: int,
        num_swap_slots: int,
        page_nbytes: int,
        num_state_slots: int = 0,
        state_nbytes: int = 0,
    ) -> None:
        """Raise BatchError if the ops break the contract (shapes, dtypes, ranges, duplicate destinations)."""
        self._validate_state(num_state_slots, state_nbytes)
        for name in ("swap_out", "copy", "swap_in"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 2 or a.dtype.kind not in "iu":
                raise BatchError(
                    f"PageOps.{name} must be an integer array of shape [n, 2], got {_describe(a)}"
                )
        for name in ("write", "read"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
                raise BatchError(f"PageOps.{name} must be an integer array of shape [n], got {_describe(a)}")
        if (len(self.swap_out) or len(self.swap_in)) and num_swap_slots < 1:
            raise BatchError(
                "PageOps swaps pages but this driver has no host swap pool (num_swap_slots is 0); "
                "enable one with swap_pool_size (cuda_native) or cpu_mem_budget_in_gb (dev)"
            )
        pages = f"device page (0..{num_pages - 1})"
        slots = f"host swap slot (0..{num_swap_slots - 1})"
        _check_range(self.swap_out[:, 0], num_pages, "swap_out", pages)
        _check_range(self.swap_out[:, 1], num_swap_slots, "swap_out", slots)
        _check_range(self.copy[:, 0], num_pages, "copy", f"source {pages}")
        _check_range(self.copy[:, 1], num_pages, "copy", f"destination {pages}")
        _check_range(self.swap_in[:, 0], num_swap_slots, "swap_in", slots)
        _check_range(self.swap_in[:, 1], num_pages, "swap_in", pages)
        _check_range(self.write, num_pages, "write", pages)
        _check_range(self.read, num_pages, "read", pages)
        _check_unique(self.swap_out[:, 1], "swap_out", "host slot")
        _check_unique(self.copy[:, 1], "copy", "destination page")
        _check_unique(self.swap_in[:, 1], "swap_in", "device page")
        _check_unique(self.write, "write", "device page")
        W = len(self.write)
        if W == 0:
            if self.write_data is not None and self.write_data.size:
                raise BatchError("PageOps.write_data is given but write names no pages")
            return
        d = self.write_data
        if d is None:
            raise BatchError(f"PageOps.write names {W} pages but write_data is missing")
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != (W, page_nbytes):
            raise BatchError(
                f"PageOps.write_data must be uint8 of shape [{W}, {page_nbytes}] (one row of raw page bytes per "
                f"written page; page_nbytes comes from Capabilities), got {_describe(d)}"
            )

    def _validate_state(self, num_state_slots: int, state_nbytes: int) -> None:
        if not self.has_state_ops:
            return
        if num_state_slots < 1:
            raise BatchError("PageOps moves recurrent state but this driver's model has no recurrent layers")
        a = self.state_copy
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 2 or a.dtype.kind not in "iu":
            raise BatchError(
                f"PageOps.state_copy must be an integer array of shape [n, 2], got {_describe(a)}"
            )
        slots = f"state slot (0..{num_state_slots - 1})"
        _check_range(a.reshape(-1), num_state_slots, "state_copy", slots)
        _check_unique(a[:, 1], "state_copy", "state slot")
        _check_range(self.state_write, num_state_slots, "state_write", slots)
        _check_unique(self.state_write, "state_write", "state slot")
        _check_range(self.state_read, num_state_slots, "state_read", slots)
        W, d = len(self.state_write), self.state_write_data
        if W and (not isinstance(d, np.ndarray) or d.dtype != np.uint8 or d.shape != (W, state_nbytes)):
            raise BatchError(
                f"PageOps.state_write_data must be uint8 of shape [{W}, {state_nbytes}], got {_describe(d)}"
            )

    def to_wire(self) -> dict:
        return {f.name: _arr_to_wire(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_wire(cls, d: dict) -> PageOps:
        return cls(**{k: _arr_from_wire(v) for k, v in d.items()})


@dataclass
class PageOpsResult:
    data: np.ndarray | None = None  # [R, page_nbytes] uint8, the pages of PageOps.read in order
    state_data: np.ndarray | None = None  # [R, state_nbytes] uint8, the slots of PageOps.state_read in order

    def to_wire(self) -> dict:
        return {"data": _arr_to_wire(self.data), "state_data": _arr_to_wire(self.state_data)}

    @classmethod
    def from_wire(cls, d: dict) -> PageOpsResult:
        return cls(data=_arr_from_wire(d["data"]), state_data=_arr_from_wire(d.get("state_data")))


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {list(a.shape)}"
    return type(a).__name__


def _check_range(a: np.ndarray, n: int, op: str, what: str) -> None:
    if a.size and (a.min() < 0 or a.max() >= n):
        bad = int(a[(a < 0) | (a >= n)][0])
        raise BatchError(f"PageOps.{op}: {bad} is not a valid {what}")


def _check_unique(a: np.ndarray, op: str, what: str) -> None:
    if a.size > 1:
        s = np.sort(a)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise BatchError(f"PageOps.{op} names {what} {int(dup[0])} as a destination twice")


@dataclass
class Capabilities:
    """A driver's answer to the handshake, before the first forward pass."""

    protocol_version: int
    architecture: str  # HF model_type
    num_pages: int
    page_size: int
    vocab_size: int
    max_batch_tokens: int
    max_batch_size: int
    max_dist_size: int
    device: str
    dtype: str
    num_layers: int = 0
    extra: dict = field(default_factory=dict)
    # Page movement (PageOps): host swap slots, bytes of one page across all layers, and a string that
    # differs whenever saved page bytes would not be valid here (model, weights, page size, KV dtype/layout).
    num_swap_slots: int = 0
    page_nbytes: int = 0
    kv_fingerprint: str = ""
    # Recurrent state (hybrid models): slots of the state pool and the raw bytes of one slot; 0 without.
    num_state_slots: int = 0
    state_nbytes: int = 0

    def to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, d: dict) -> Capabilities:
        return cls(**d)


def _arr_to_wire(a):
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _arr_from_wire(d):
    if d is None:
        return None
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def make_batch(
    requests: list[dict],
    page_size: int,
) -> ForwardBatch:
    """Build a ForwardBatch from per-request dicts (tests, tools; the scheduler has a vectorized path).

    Each dict: token_ids, positions, pages, last_page_len, and optionally
    outputs (indices local to the request), state_slot (hybrid models), sampler fields per output
    (temperature, top_k, top_p, min_p, seed, dist_k, return_logits), mask ([n, kv_len] bool).
    """
    tok, pos, qo, pages, pindptr, last, outs = [], [], [0], [], [0], [], []
    samp: dict[str, list] = {
        k: [] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "dist_k", "return_logits")
    }
    defaults = {
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "seed": -1,
        "dist_k": 0,
        "return_logits": False,
    }
    masks, any_mask = [], any(r.get("mask") is not None for r in requests)
    slots = [r.get("state_slot") for r in requests]
    for r in requests:
        base = qo[-1]
        n = len(r["token_ids"])
        tok.extend(r["token_ids"])
        pos.extend(r["positions"])
        qo.append(base + n)
        pages.extend(r["pages"])
        pindptr.append(len(pages))
        last.append(r["last_page_len"])
        local = r.get("outputs", [])
        outs.extend(base + i for i in local)
        for k in samp:
            v = r.get(k, defaults[k])
            samp[k].extend(v if isinstance(v, (list, tuple)) else [v] * len(local))
        if any_mask:
            kv_len = (len(r["pages"]) - 1) * page_size + r["last_page_len"]
            m = r.get("mask")
            if m is None:  # causal over slots
                m = np.tril(np.ones((n, kv_len), dtype=bool), k=kv_len - n)
            masks.append(np.asarray(m, dtype=bool).reshape(-1))
    mask = mask_indptr = None
    if any_mask:
        mask = np.concatenate(masks)
        mask_indptr = np.concatenate([[0], np.cumsum([m.size for m in masks])]).astype(np.int64)
    return ForwardBatch(
        token_ids=np.asarray(tok, dtype=np.int64),
        positions=np.asarray(pos, dtype=np.int64),
        qo_indptr=_i32(qo),
        kv_page_indices=_i32(pages),
        kv_page_indptr=_i32(pindptr),
        kv_last_page_len=_i32(last),
        output_indices=_i32(outs),
        temperature=np.asarray(samp["temperature"], dtype=np.float32),
        top_k=_i32(samp["top_k"]),
        top_p=np.asarray(samp["top_p"], dtype=np.float32),
        min_p=np.asarray(samp["min_p"], dtype=np.float32),
        seed=np.asarray(samp["seed"], dtype=np.int64),
        dist_k=_i32(samp["dist_k"]),
        return_logits=np.asarray(samp["return_logits"], dtype=bool),
        mask=mask,
        mask_indptr=mask_indptr,
        state_slots=_i32(slots) if all(s is not None for s in slots) else None,
    )
