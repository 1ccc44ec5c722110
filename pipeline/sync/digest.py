"""`tensor_digest`: the fingerprint that proves a weight push landed, computed where the tensor lives
(torch ops on a GPU, numpy on a CPU: nothing is copied to the host but two 64-bit sums). Both sides of
a push compute it: the trainer on what it sent and on each worker's expected shard, the workers on what
they loaded, our gloo engine on what it received. An integrity check, not a cryptographic hash: the
transfer group is our own, so what it must catch is corruption, misplaced or stale bytes (README
"The digest" says why that is enough and what it catches).

Definition (little-endian bytes): the tensor's bytes in row-major order, zero-padded to a multiple of 4,
read as signed 32-bit words w_i; two sums S_s = sum_i w_i * T_s[i mod W] * G_s[i div W] (mod 2^64),
s = 0, 1, W = `BLOCK_WORDS`, with T_s[j] = mix(SEEDS[s] + j * GAMMA) | 1, G_s[b] = mix(BLOCK_SEEDS[s] +
b * GAMMA) | 1 (splitmix64's finaliser: odd multipliers that depend on the position only); the digest
is "<dtype>[<shape>]:" and S_0, S_1 in hex. Wrapping integer sums do not depend on the order of
addition: the same on every device, however the bytes are chunked (`chunk_bytes`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

BLOCK_WORDS = 2**20  # W: words per table period (a 4 MiB block of bytes)
DEFAULT_CHUNK_BYTES = 4 * BLOCK_WORDS  # the most bytes processed at once (the temporaries scale with it)
GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)  # pi's digits: the word tables T_0, T_1
BLOCK_SEEDS = (0xA4093822299F31D0, 0x082EFA98EC4E6C89)  # the block tables G_0, G_1
MASK = 2**64 - 1

HOST_RUN_WORDS = 2**16  # the host path's words per numpy step: its 1.5 MiB of temporaries stay in cache

_tables: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
_host: dict[str, np.ndarray] = {}
_lock = threading.Lock()


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (numpy's uint64 arithmetic wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def multipliers(seeds: tuple[int, int], start: int, count: int) -> np.ndarray:
    """mix(seed + j * GAMMA) | 1 for j in [start, start + count), per seed: shape (count, 2), as int64
    (the same 64 bits; torch has no uint64 arithmetic on every device)."""
    j = np.arange(start, start + count, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        out = mix(np.array(seeds, dtype=np.uint64)[None, :] + j * np.uint64(GAMMA)) | np.uint64(1)
    return out.view(np.int64)


def _host_tables(blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(T: [2, W], G: [>= blocks, 2]) as uint64, made once per process and kept (the caller holds _lock)."""
    if "word" not in _host:
        _host["word"] = multipliers(SEEDS, 0, BLOCK_WORDS).T.copy().view(np.uint64)
    if "block" not in _host or _host["block"].shape[0] < blocks:
        _host["block"] = multipliers(BLOCK_SEEDS, 0, max(64, 1 << (blocks - 1).bit_length())).view(np.uint64)
    return _host["word"], _host["block"]


def _device_tables(device: torch.device, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables on `device` as int64 (the same 64 bits; torch has no uint64 arithmetic on every
    device), copied there once per device (constants, not the tensor's bytes) and kept."""
    key = (device.type, device.index)
    with _lock:
        host_word, host_block = _host_tables(blocks)
        word, block = _tables.get(key, (None, None))
        if word is None:
            word = torch.from_numpy(host_word.view(np.int64)).to(device)
        if block is None or block.shape[0] < blocks:
            block = torch.from_numpy(host_block.view(np.int64)).to(device)
        _tables[key] = (word, block)
        return word, block


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view (one element may carry any stride: made 1)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 1:
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8)


def _byte_pieces(tensor: torch.Tensor, chunk_bytes: int):
    """The tensor's bytes in row-major order as contiguous 1-D uint8 tensors of at most about
    `chunk_bytes` each, on its device: views where it is contiguous, else copies of a few rows at a time."""
    if tensor.is_contiguous():
        flat = _bytes(tensor)
        for start in range(0, flat.numel(), chunk_bytes):
            yield flat[start : start + chunk_bytes]
    elif tensor.dim() <= 1:
        step = max(1, chunk_bytes // tensor.element_size())
        for start in range(0, tensor.numel(), step):
            yield _bytes(tensor[start : start + step].contiguous())
    else:
        row_bytes = tensor[0].numel() * tensor.element_size()
        if row_bytes <= chunk_bytes:
            rows = max(1, chunk_bytes // row_bytes)
            for start in range(0, tensor.shape[0], rows):
                yield _bytes(tensor[start : start + rows].contiguous())
        else:
            for row in tensor:
                yield from _byte_pieces(row, chunk_bytes)


def _word_runs(tensor: torch.Tensor, chunk_bytes: int):
    """(int32 words, index of the first) covering the bytes, zero-padded to whole words at the end."""
    carry, position = None, 0
    for piece in _byte_pieces(tensor, chunk_bytes):
        if carry is not None:  # 1-3 bytes left over from the last piece: they start this one's first word
            piece, carry = torch.cat([carry, piece]), None
        whole = piece.numel() // 4 * 4
        if whole < piece.numel():
            carry = piece[whole:]
        if whole:
            body = piece[:whole]
            if body.storage_offset() % 4:  # a view at an odd offset of a larger buffer: int32 needs alignment
                body = body.clone()
            yield body.view(torch.int32), position
            position += whole // 4
    if carry is not None:
        yield torch.cat([carry, carry.new_zeros(4 - carry.numel())]).view(torch.int32), position


def _segments(position: int, count: int, most: int):
    """(offset in the run, block, offset in the block, length): the run cut where the block changes."""
    done = 0
    while done < count:
        block, offset = divmod(position + done, BLOCK_WORDS)
        n = min(BLOCK_WORDS - offset, count - done, most)
        yield done, block, offset, n
        done += n


def device_sums(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The two wrapped 64-bit sums (see the module docstring) as an int64 tensor of 2 on the tensor's
    own device, computed with torch ops there: nothing of the tensor leaves it."""
    tensor = tensor.detach()
    chunk_bytes = max(4, chunk_bytes // 4 * 4)
    acc = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    if tensor.numel() == 0:
        return acc
    words = -(-tensor.numel() * tensor.element_size() // 4)
    word_table, block_table = _device_tables(tensor.device, -(-words // BLOCK_WORDS))
    scratch = torch.empty(
        2 * min(BLOCK_WORDS, words, chunk_bytes // 4), dtype=torch.int64, device=tensor.device
    )
    for run, position in _word_runs(tensor, chunk_bytes):
        for start, block, offset, n in _segments(position, run.numel(), BLOCK_WORDS):
            products = scratch[: 2 * n].view(2, n)
            torch.mul(run[start : start + n], word_table[:, offset : offset + n], out=products)
            acc += products.sum(1) * block_table[block]
    return acc


def host_sums(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """The same two sums (uint64) for a tensor in host memory, in numpy on that memory (no copy where it
    is contiguous), single-threaded."""
    if tensor.device.type != "cpu":
        raise ValueError(f"host_sums takes a CPU tensor, not one on {tensor.device}: use device_sums")
    tensor = tensor.detach()
    chunk_bytes = max(4, chunk_bytes // 4 * 4)
    acc = np.zeros(2, dtype=np.uint64)
    if tensor.numel() == 0:
        return acc
    words = -(-tensor.numel() * tensor.element_size() // 4)
    with _lock:
        word_table, block_table = _host_tables(-(-words // BLOCK_WORDS))
    wide = np.empty(min(HOST_RUN_WORDS, words), dtype=np.int64)
    products = np.empty((2, wide.size), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for run, position in _word_runs(tensor, chunk_bytes):
            run = run.numpy()
            for start, block, offset, n in _segments(position, run.size, HOST_RUN_WORDS):
                np.copyto(wide[:n], run[start : start + n])  # sign-extended: the int32 word as an int64
                np.multiply(wide[:n].view(np.uint64), word_table[:, offset : offset + n], out=products[:, :n])
                acc += products[:, :n].sum(axis=1, dtype=np.uint64) * block_table[block]
    return acc


def tensor_sums(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[int, int]:
    """S_0, S_1 as Python ints in [0, 2^64): numpy on the host for a CPU tensor, torch on its device
    for any other (only these two numbers come back)."""
    if tensor.device.type == "cpu":
        first, second = host_sums(tensor, chunk_bytes).tolist()
    else:
        first, second = device_sums(tensor, chunk_bytes).tolist()
    return first & MASK, second & MASK


def tensor_digest(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> str:
    """ "<dtype>[<shape>]:<32 hex digits>": an integrity digest of the tensor's bytes computed where the
    tensor is (module docstring: what it is, why an integrity check suffices here, what it catches).
    Equal for equal dtype, shape and bytes on any device."""
    first, second = tensor_sums(tensor, chunk_bytes)
    shape = ",".join(str(d) for d in tensor.shape)
    return f"{str(tensor.dtype).removeprefix('torch.')}[{shape}]:{first:016x}{second:016x}"
