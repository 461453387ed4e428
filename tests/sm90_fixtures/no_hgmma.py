"""A bf16 "matrix" kernel written as broadcast multiply and sum: no tensor cores, so no HGMMA."""

import triton
import triton.language as tl


@triton.jit
def outer_sum_kernel(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    a = tl.load(A + tl.arange(0, BM)[:, None] * BK + tl.arange(0, BK)[None, :]).to(tl.float32)
    b = tl.load(B + tl.arange(0, BK)[:, None] * BN + tl.arange(0, BN)[None, :]).to(tl.float32)
    c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    tl.store(C + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], c)


def sm90_builds() -> list[dict]:
    sig = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "BM": "constexpr", "BN": "constexpr"}
    sig["BK"] = "constexpr"
    return [{"name": "outer_16", "fn": outer_sum_kernel, "signature": sig,
             "constexprs": {"BM": 16, "BN": 16, "BK": 16}, "num_warps": 4, "num_stages": 1,
             "matrix": True}]  # fmt: skip
