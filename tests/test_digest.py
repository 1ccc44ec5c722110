"""`tensor_digest` (pipeline/sync/digest.py): the integrity digest both sides of a weight push compute on
the tensor's own device. Equal for equal bytes however the tensor is laid out or cut into chunks, different
for any one-bit flip, for values moved to other positions and for the same bytes under another shape or
dtype; on a device nothing of the tensor is copied to the host (checked on the meta device, which has no
bytes). Its two implementations, torch on the device and numpy on the host, are held to one definition
(`reference_sums`) and to each other (here on the CPU; tests/test_gpu.py on CUDA)."""

import numpy as np
import pytest
import torch

from pipeline.sync.digest import (
    BLOCK_SEEDS,
    BLOCK_WORDS,
    GAMMA,
    MASK,
    SEEDS,
    device_sums,
    host_sums,
    multipliers,
    tensor_digest,
)

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def sample(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(
        max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64
    ).to(dtype)


def splitmix_finaliser(x: int) -> int:
    """splitmix64's finaliser in plain Python integers: the definition the tables must follow."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_sums(t: torch.Tensor) -> list[int]:
    """The module docstring's definition, in numpy on the host: the bytes in row-major order, zero-padded
    to whole little-endian int32 words w_i, S_s = sum w_i * T_s[i mod W] * G_s[i div W] mod 2^64."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 4)
    words = np.frombuffer(raw, dtype="<i4").astype(np.int64).view(np.uint64)
    i = np.arange(len(words))
    word = multipliers(SEEDS, 0, BLOCK_WORDS).view(np.uint64)
    block = multipliers(BLOCK_SEEDS, 0, int(i[-1]) // BLOCK_WORDS + 1 if len(i) else 1).view(np.uint64)
    with np.errstate(over="ignore"):
        return [
            int((words * word[i % BLOCK_WORDS, s] * block[i // BLOCK_WORDS, s]).sum(dtype=np.uint64))
            for s in range(2)
        ]


def sums(t: torch.Tensor, **kw) -> list[int]:
    """The sums by both implementations, which must agree: torch's (what a GPU runs, here on the CPU)
    and numpy's on the host."""
    on_device = [v & MASK for v in device_sums(t, **kw).tolist()]
    on_host = [int(v) for v in host_sums(t, **kw)]
    assert on_device == on_host
    return on_host


def flipped(t: torch.Tensor, byte: int, bit: int) -> torch.Tensor:
    out = t.clone()
    out.view(-1).view(torch.uint8)[byte] ^= 1 << bit
    return out


def test_the_tables_are_splitmix64_of_the_position():
    for seeds in (SEEDS, BLOCK_SEEDS):
        got = multipliers(seeds, 5, 3).view(np.uint64)
        for j in range(3):
            for s in range(2):
                assert int(got[j, s]) == splitmix_finaliser((seeds[s] + (5 + j) * GAMMA) & MASK) | 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5), (1,), ()])
def test_the_digest_follows_its_definition(dtype, shape):
    """Odd element counts (7 bf16 = 14 bytes, 5 int8, ...) pad the last word with zeros."""
    t = sample(shape, dtype)
    assert sums(t) == reference_sums(t)
    assert tensor_digest(t).startswith(f"{str(dtype).removeprefix('torch.')}[{','.join(map(str, shape))}]:")


def test_across_blocks_and_in_chunks_smaller_than_the_tensor():
    """A tensor of 2.5 blocks, contiguous and transposed (non-contiguous), digested in chunks of odd
    sizes that cut words and blocks anywhere: always the definition's sums. Small tensors in chunks of a
    few bytes (rows split, the 1-3 bytes of a word carried into the next chunk)."""
    t = sample((1601, 1637), torch.float32)  # 2,620,837 words: blocks 0, 1 and half of 2
    expected = reference_sums(t)
    for chunk in (4 * BLOCK_WORDS, 1_000_003, 4 * 1637 * 7):
        assert sums(t, chunk_bytes=chunk) == expected
    tt = sample((1637, 1601), torch.bfloat16).T  # rows of 1637 bf16: 3,274 bytes, not whole words
    assert not tt.is_contiguous()
    expected = reference_sums(tt)
    for chunk in (4 * BLOCK_WORDS, 1_000_001, 3274 * 9):
        assert sums(tt, chunk_bytes=chunk) == expected
    assert tensor_digest(tt, chunk_bytes=1_000_001) == tensor_digest(tt.contiguous())
    for small in (
        sample((13, 7), torch.bfloat16).T,
        sample((5, 3, 7), torch.int8).transpose(0, 2),
        sample((50,), torch.float16)[::3],
        sample((9, 11), torch.float32),
    ):
        for chunk in (1, 6, 10, 22, 101):
            assert sums(small, chunk_bytes=chunk) == reference_sums(small), (small.shape, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_view_and_its_contiguous_copy_agree(dtype):
    t = sample((9, 13), dtype)
    for view in (
        t.T,
        t[:, 1:12:3],
        t[2:7],
        t.reshape(3, 39)[:, 5:],
        t.view(-1)[1:],
    ):  # the last at an odd offset
        assert tensor_digest(view) == tensor_digest(view.contiguous()) == tensor_digest(view.clone())


def test_a_view_at_an_unaligned_offset_of_a_byte_buffer():
    """The gloo engine digests views into its received bucket: at offsets that are no multiple of 4."""
    t = sample((11,), torch.bfloat16)
    buffer = torch.zeros(64, dtype=torch.uint8)
    buffer[6:28] = t.view(torch.uint8)
    assert tensor_digest(buffer[6:28].view(torch.bfloat16)) == tensor_digest(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.int8, torch.bool])
def test_any_one_bit_flip_changes_the_digest(dtype):
    t = sample((5, 7), dtype) if dtype != torch.bool else torch.zeros(5, 7, dtype=torch.bool)
    size = t.element_size()
    reference = tensor_digest(t)
    for element in (0, t.numel() // 2, t.numel() - 1):  # first, middle, last
        for byte in range(size):
            for bit in range(8) if dtype != torch.bool else [0]:
                assert tensor_digest(flipped(t, element * size + byte, bit)) != reference, (
                    element,
                    byte,
                    bit,
                )


def test_a_flip_anywhere_in_a_large_tensor_changes_both_sums():
    t = sample((3 * BLOCK_WORDS + 5,), torch.int32)
    reference = sums(t)
    for word in (0, BLOCK_WORDS - 1, BLOCK_WORDS, 2 * BLOCK_WORDS + 17, t.numel() - 1):
        for bit in (0, 13, 31):
            changed = sums(flipped(t, 4 * word + bit // 8, bit % 8))
            assert changed[0] != reference[0] and changed[1] != reference[1], (word, bit)


def test_the_same_values_in_other_positions_differ():
    a = sample((64, 64), torch.bfloat16)
    reference = tensor_digest(a)
    swapped = a.clone()
    swapped[3, 5], swapped[40, 2] = a[40, 2], a[3, 5]
    for moved in (
        a.T,
        a.T.contiguous(),
        a.flip(0),
        a.flip(1),
        a.roll(1),
        a.roll(1, dims=0),
        swapped,
        a.view(-1)[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))].view(64, 64),
    ):
        assert tensor_digest(moved) != reference
    # words at the same offset of two blocks swapped: the block multipliers tell them apart
    big = sample((2 * BLOCK_WORDS,), torch.int32)
    other = big.clone()
    other[7], other[BLOCK_WORDS + 7] = big[BLOCK_WORDS + 7], big[7]
    assert sums(other)[0] != sums(big)[0] and sums(other)[1] != sums(big)[1]


def test_the_same_bytes_under_another_shape_or_dtype_differ():
    a = sample((6, 4), torch.float32)
    assert tensor_digest(a) != tensor_digest(a.reshape(4, 6)) != tensor_digest(a.reshape(24))
    assert tensor_digest(a) != tensor_digest(a.view(torch.int32))
    assert tensor_digest(torch.zeros(0)) != tensor_digest(torch.zeros(0, 3))
    assert tensor_digest(torch.zeros(3, dtype=torch.uint8)) != tensor_digest(
        torch.zeros(4, dtype=torch.uint8)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_nothing_of_the_tensor_leaves_its_device(dtype):
    """On the meta device a tensor has no bytes: anything that copies it to the host (`.cpu()`,
    `.numpy()`, `.item()`, sha256 of its bytes) raises there. The sums come out as a tensor on that
    device, contiguous or not, whole or in chunks smaller than the tensor."""
    t = torch.empty(1031, 777, dtype=dtype, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        t.cpu()  # what the sha256 digest did first
    for view, chunk in (
        (t, 4 * BLOCK_WORDS),
        (t, 1000),
        (t.T, 4 * BLOCK_WORDS),
        (t.T, 999),
        (t[:, 1::2], 5000),
    ):
        out = device_sums(view, chunk_bytes=chunk)
        assert out.device.type == "meta" and out.shape == (2,) and out.dtype == torch.int64


def test_the_sender_keeps_the_sample_on_its_device_without_copying_it():
    """ModelSource keeps the checksum sample where the trainer's tensors are (on a GPU, GPU memory): on the
    meta device a copy to the host would raise. Where nothing changes the sent tensor before the check
    (no ZeRO-3), the kept tensor is the sent one, not a copy."""
    from pipeline.sync.weight_sync import ModelSource

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.norm = torch.nn.LayerNorm(4)

    meta = ModelSource(Tiny().to("meta"), 0, True, torch.bfloat16, torch.device("meta"))
    meta.keep = {"embed.weight", "norm.bias"}
    list(meta)
    assert set(meta.kept) == meta.keep and all(t.device.type == "meta" for t in meta.kept.values())

    cpu = ModelSource(Tiny(), 0, True, torch.float32, torch.device("cpu"))
    cpu.keep = {"embed.weight"}
    sent = dict(iter(cpu))
    assert cpu.kept["embed.weight"] is sent["embed.weight"]
