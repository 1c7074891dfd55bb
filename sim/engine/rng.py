"""Counter-based random numbers: one independent stream per run, the same on any batch and device.

A run's samples must not depend on which other runs share its batch (a batch of 400 runs must give each
run exactly what it gets when trained alone), nor on the device. A stateful ``torch.Generator`` cannot give
that without a Python loop over runs, so reflab draws every random number as a hash of
``(run key, stream, counter)``: ``u = triple32(key ^ triple32(stream ^ counter))``-style mixing, computed
with int64 tensor ops. A 32 × 32-bit product can exceed int64; tensor kernels wrap modulo 2^64, whose low
32 bits are what the hash needs. That is checked once at import against a product split into 16-bit
halves (which never overflows), and the split form is used if the check fails. Per-element draws
(:func:`uniform_at`) run the same hash on int32 bit patterns when a check at import shows int32 products
wrap modulo 2^32 (bitwise the same numbers, half the memory traffic).

The hash is Chris Wellons' ``triple32`` (an exact-bias 32-bit integer permutation); uniforms have 2^-32
resolution, which is ample for categorical sampling of probabilities above ~1e-9.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mul32_split(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32) without int64 overflow."""
    lo = x * (c & _MASK16)
    hi = ((x * (c >> 16)) & _MASK16) << 16
    return (lo + hi) & _MASK32


def _mul32_wrap(x: Tensor | int, c: int) -> Tensor | int:
    """``(x * c) mod 2**32`` relying on the int64 product wrapping modulo 2**64 (a Python int: exact)."""
    return (x * c) & _MASK32


def _wrap_is_exact() -> bool:
    x = torch.tensor([0, 1, _MASK32, _MASK32 - 1, 0x9E3779B9, 0x7FFFFFFF, 0x80000000, 123456789], dtype=torch.long)
    return all(torch.equal(_mul32_wrap(x, c), _mul32_split(x, c)) for c in _CONSTANTS)


_CONSTANTS = (0xED5AD4BB, 0xAC4C1B51, 0x31848BAB)
_mul32 = _mul32_wrap if _wrap_is_exact() else _mul32_split


def hash32(x: Tensor | int) -> Tensor | int:
    """The ``triple32`` integer hash, elementwise on int64 tensors holding values in [0, 2**32), or of one Python
    int in that range (the same integer arithmetic, exact)."""
    mul = _mul32 if isinstance(x, Tensor) else _mul32_wrap
    x = x ^ (x >> 17)
    x = mul(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = mul(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = mul(x, 0x31848BAB)
    x = x ^ (x >> 14)
    return x


def _signed32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


_I32_CONSTANTS: dict[str, dict[str, Tensor]] = {}


def _i32(device: torch.device) -> dict[str, Tensor]:
    """The int32 hash's constants as 0-d int32 tensors on ``device`` (a Python int operand would be cast
    from int64 on every op)."""
    key = str(device)
    if key not in _I32_CONSTANTS:
        values = {"s17": 17, "m15": 0x7FFF, "c1": _signed32(0xED5AD4BB), "s11": 11, "m21": 0x1FFFFF,
                  "c2": _signed32(0xAC4C1B51), "s15": 15, "m17": 0x1FFFF, "c3": _signed32(0x31848BAB),
                  "s14": 14, "m18": 0x3FFFF, "s7": 7, "m25": 0x1FFFFFF}
        _I32_CONSTANTS[key] = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in values.items()}
    return _I32_CONSTANTS[key]


def _hash32_i32_(x: Tensor) -> Tensor:
    """:func:`hash32` in place on an int32 tensor ``x`` holding the same 32-bit patterns (products wrap modulo
    2^32; the right shifts are made logical by masking): half the memory of the int64 form, a native vector
    multiply and one scratch tensor. Used for the draws when :data:`_I32_EXACT`."""
    c = _i32(x.device)
    t = torch.empty_like(x)
    for s, m, mul in (("s17", "m15", "c1"), ("s11", "m21", "c2"), ("s15", "m17", "c3"), ("s14", "m18", None)):
        torch.bitwise_right_shift(x, c[s], out=t)
        x.bitwise_xor_(t.bitwise_and_(c[m]))
        if mul is not None:
            x.mul_(c[mul])
    return x


def _draw_i32(k: Tensor, counter: Tensor) -> Tensor:
    """The draws' two hash rounds on int32 patterns: ``hash(hash(k ^ counter) ^ (k >> 7))`` for 32-bit keys
    ``k`` and hashed counters ``counter`` (broadcast against each other), as unsigned uniforms (:func:`_unit_i32`)."""
    c = _i32(k.device)
    h = _hash32_i32_(k ^ counter)
    return _unit_i32(_hash32_i32_(h.bitwise_xor_((k >> c["s7"]) & c["m25"])))


def _unit_i32(h: Tensor) -> Tensor:
    """:func:`_unit` of the unsigned 32-bit value whose bit pattern the int32 ``h`` holds: the unique float64
    ``(h mod 2^32 + ½)/2^32``. Read as ``uint32`` where torch converts that dtype exactly (checked once);
    otherwise ``_unit(h)`` of the signed value, which lies in (−½, ½), and ``u − floor(u)`` adds 1 to the
    negative ones (exact, like ``remainder(_unit(h), 1)``)."""
    if _UINT32_VIEW:
        return h.view(torch.uint32).to(torch.float64).add_(0.5).mul_(1.0 / 4294967296.0)
    u = h.to(torch.float64).add_(0.5).mul_(1.0 / 4294967296.0)
    return u.sub_(torch.floor(u))


def _uint32_view_is_exact() -> bool:
    """Whether this torch has ``uint32`` and converts it to float64 as the unsigned values (checked on bit
    patterns of both signs, long enough for the vectorized loops and their remainders)."""
    if not hasattr(torch, "uint32"):
        return False
    vals = [0, 1, 2, 2**31 - 1, 2**31, 2**31 + 1, 0x9E3779B9, _MASK32 - 1, _MASK32] * 5
    try:
        got = torch.tensor(vals, dtype=torch.long).to(torch.int32).view(torch.uint32).to(torch.float64)
    except (RuntimeError, TypeError):
        return False
    return got.tolist() == [float(v) for v in vals]


def _i32_is_exact() -> bool:
    x = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, _MASK32 - 1, _MASK32, 0x9E3779B9]),
                   torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0))])
    x = x.repeat(3)  # long enough for the vectorized loops and their remainders
    as_i32 = hash32(x).to(torch.int32)
    return torch.equal(_hash32_i32_(x.to(torch.int32)), as_i32) and torch.equal(
        _hash32_i32_(x[:7].to(torch.int32)), as_i32[:7])


def fold(key: Tensor, value: int | Tensor) -> Tensor:
    """A new key derived from ``key`` (int64 ``[R]``) and ``value``: independent streams per value (a Python
    int's inner hash is computed in Python, the same number without a tensor)."""
    if isinstance(value, int) and -(1 << 63) <= value < 1 << 63:
        return hash32(key ^ hash32((value & _MASK32) ^ 0x9E3779B9))
    v = torch.as_tensor(value, dtype=torch.long, device=key.device) & _MASK32
    return hash32(key ^ hash32(v ^ 0x9E3779B9))


class UpdateKeys:
    """``fold(keys, update)`` of runs ``keys [R]`` and its streams ``fold(fold(keys, update), stream)``, folded
    for :attr:`block` consecutive updates at once (every element folded as alone: the same numbers as
    folding one update at a time, with a few tensor passes per block instead of per update)."""

    block = 32

    def __init__(self, keys: Tensor):
        self.keys = keys
        self._cache: dict[tuple[int, int | None], Tensor] = {}

    def __call__(self, update: int, stream: int | None = None) -> Tensor:
        """``fold(keys, update)`` ``[R]``, or with ``stream`` ``fold(fold(keys, update), stream)``."""
        b, i = divmod(update, self.block)
        if (b, stream) not in self._cache:
            if all(k[0] != b for k in self._cache):
                self._cache.clear()
            if (b, None) not in self._cache:
                values = torch.arange(b * self.block, (b + 1) * self.block, device=self.keys.device)
                self._cache[(b, None)] = fold(self.keys.unsqueeze(0), values.unsqueeze(1))  # [block, R]
            if stream is not None:
                self._cache[(b, stream)] = fold(self._cache[(b, None)], stream)
        return self._cache[(b, stream)][i]


def run_keys(seeds: list[int] | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Keys ``[R]`` for runs with the given integer seeds (any int; 64-bit seeds are folded to 32)."""
    s = torch.as_tensor(seeds, dtype=torch.long, device=device)
    return hash32(hash32(s & _MASK32) ^ ((s >> 32) & _MASK32))


_COUNTER_CACHE: dict[tuple[int, str, torch.dtype], Tensor] = {}
_I32_EXACT = _i32_is_exact()
_UINT32_VIEW = _uint32_view_is_exact()


def _hashed_counter(n: int, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """``hash32(arange(n))`` (as ``dtype``: int64, or int32 bit patterns), cached per size."""
    k = (n, str(device), dtype)
    if k not in _COUNTER_CACHE:
        if len(_COUNTER_CACHE) > 64:
            _COUNTER_CACHE.clear()
        _COUNTER_CACHE[k] = hash32(torch.arange(n, dtype=torch.long, device=device)).to(dtype)
    return _COUNTER_CACHE[k]


def uniform(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniforms in (0, 1), ``[R, *shape]``, from keys ``[R]``; element i of run r depends only on (key_r, i)."""
    n = 1
    for d in shape:
        n *= d
    if not _I32_EXACT:
        h = hash32(key[:, None] ^ _hashed_counter(n, key.device)[None, :])
        h = hash32(h ^ (key[:, None] >> 7))
        return _unit(h).reshape((key.shape[0],) + tuple(shape)).to(dtype)
    # the int32 form: bitwise the same numbers, about twice as fast
    u = _draw_i32(key.to(torch.int32)[:, None], _hashed_counter(n, key.device, torch.int32)[None, :])
    return u.reshape((key.shape[0],) + tuple(shape)).to(dtype)


def _unit(h: Tensor) -> Tensor:
    """``(h + 0.5)/2^32`` in float64: a uniform in (0, 1) from a hash value ``h`` in [0, 2^32) (exact)."""
    return (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def uniform_at(key: Tensor, index: Tensor, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Selected elements of :func:`uniform` streams, bitwise equal to them: element ``index[k]`` of
    ``uniform(key[k], shape)`` for any ``shape`` of ``n`` elements. ``key`` and ``index`` are ``[K]`` (or
    broadcast against each other)."""
    if not _I32_EXACT:
        h = hash32(key ^ torch.take(_hashed_counter(n, key.device), index))
        return _unit(hash32(h ^ (key >> 7))).to(dtype)
    # a gather along one axis (torch.take's values, several times faster)
    counter = _hashed_counter(n, key.device, torch.int32).index_select(0, index.reshape(-1)).view(index.shape)
    return _draw_i32(key.to(torch.int32), counter).to(dtype)


def normal(key: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normals ``[R, *shape]`` by Box–Muller from two independent uniform streams."""
    R = key.shape[0]
    u = uniform(torch.cat([fold(key, 1), fold(key, 2)]), shape)  # both streams in one pass: [2R, *shape]
    u1, u2 = u[:R], u[R:]
    # sqrt(−2·log u1)·cos(2π·u2), each operation in place on fresh tensors (the same numbers)
    z = torch.log(u1).mul_(-2.0).sqrt_().mul_(u2.mul_(2.0 * torch.pi).cos_())
    return z.to(dtype)
