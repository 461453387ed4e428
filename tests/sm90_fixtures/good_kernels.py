"""Kernels that build cleanly for sm_90: a bf16 tile matmul (HGMMA) and an elementwise scale."""

import triton
import triton.language as tl


@triton.jit
def _tile_offsets(rows: tl.constexpr, cols: tl.constexpr):
    return tl.arange(0, rows)[:, None] * cols + tl.arange(0, cols)[None, :]


@triton.jit
def tile_matmul_kernel(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    a = tl.load(A + _tile_offsets(BM, BK))
    b = tl.load(B + _tile_offsets(BK, BN))
    tl.store(C + _tile_offsets(BM, BN), tl.dot(a, b))


@triton.jit
def scale_kernel(X, Y, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask).to(tl.float32)
    tl.store(Y + offs, x * alpha, mask=mask)


def sm90_builds() -> list[dict]:
    matmul = {"A": "*bf16", "B": "*bf16", "C": "*fp32"}
    matmul |= {"BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    return [
        {"name": "matmul_64", "fn": tile_matmul_kernel, "signature": matmul,
         "constexprs": {"BM": 64, "BN": 64, "BK": 64}, "num_warps": 4, "num_stages": 2,
         "matrix": True},
        {"name": "scale_1024", "fn": scale_kernel,
         "signature": {"X": "*bf16", "Y": "*fp32", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"},
         "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "matrix": False},
    ]  # fmt: skip
