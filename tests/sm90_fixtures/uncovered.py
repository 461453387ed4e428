"""Two kernels, one build: the second kernel escapes the check, which must say so."""

import triton
import triton.language as tl


@triton.jit
def copy_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


if triton is not None:  # hidden one level down, as kernels guarded by an import check are

    @triton.jit
    def forgotten_kernel(X, Y, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs) * 2)


def sm90_builds() -> list[dict]:
    sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
    return [{"name": "copy", "fn": copy_kernel, "signature": sig, "constexprs": {"BLOCK": 256},
             "num_warps": 4, "num_stages": 1, "matrix": False}]  # fmt: skip
