"""An 8x8 tl.dot: the interpreter runs it, the sm_90 compiler rejects it (dot needs >= 16)."""

import triton
import triton.language as tl


@triton.jit
def dot8_kernel(A, B, C, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(C + offs, tl.dot(tl.load(A + offs), tl.load(B + offs)))


def sm90_builds() -> list[dict]:
    sig = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "BLOCK": "constexpr"}
    return [{"name": "dot_8x8", "fn": dot8_kernel, "signature": sig, "constexprs": {"BLOCK": 8},
             "num_warps": 4, "num_stages": 1, "matrix": True}]  # fmt: skip
