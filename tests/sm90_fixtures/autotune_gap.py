"""An autotuned kernel with two configs and a build for only one: the other must be reported."""

import triton
import triton.language as tl


@triton.autotune(
    configs=[
        triton.Config({"BLOCK": 256}, num_warps=4),
        triton.Config({"BLOCK": 1024}, num_warps=8),
    ],
    key=["n"],
)
@triton.jit
def tuned_copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def sm90_builds() -> list[dict]:
    sig = {"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    return [{"name": "copy_256", "fn": tuned_copy_kernel, "signature": sig,
             "constexprs": {"BLOCK": 256}, "num_warps": 4, "num_stages": 3, "matrix": False}]  # fmt: skip
