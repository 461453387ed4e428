"""Builds for the TMA and warp-specialization gates: a loop of tensor-descriptor loads feeding a
matmul, built plainly, warp-specialized with 4 warps (setmaxnreg appears), and two builds that
claim what their code does not have (pointer loads marked as descriptors; a warp-specialized
request with 8 warps, which Triton 3.9 ignores on Hopper)."""

import triton
import triton.language as tl


@triton.jit
def desc_loop_kernel(A, B, C, n, BM: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(A, shape=[BM, n], strides=[n, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(B, shape=[n, BM], strides=[BM, 1], block_shape=[BK, BM])
    acc = tl.zeros([BM, BM], tl.float32)
    for k in tl.range(0, n, BK, warp_specialize=WS):
        acc = tl.dot(a_desc.load([0, k]), b_desc.load([k, 0]), acc)
    offs = tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :]
    tl.store(C + offs, acc)


@triton.jit
def pointer_matmul_kernel(A, B, C, BM: tl.constexpr):
    offs = tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :]
    tl.store(C + offs, tl.dot(tl.load(A + offs), tl.load(B + offs)))


def sm90_builds() -> list[dict]:
    loop = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "n": "i32", "BM": "constexpr",
            "BK": "constexpr", "WS": "constexpr"}  # fmt: skip
    plain = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "BM": "constexpr"}

    def build(name, fn, sig, consts, warps, **flags):
        return {"name": name, "fn": fn, "signature": sig, "constexprs": consts,
                "num_warps": warps, "num_stages": 2, "matrix": True, **flags}  # fmt: skip

    return [
        build("tma_loop", desc_loop_kernel, loop, {"BM": 128, "BK": 64, "WS": False}, 4,
              descriptors=True),
        build("tma_loop_ws4", desc_loop_kernel, loop, {"BM": 128, "BK": 64, "WS": True}, 4,
              descriptors=True, warp_specialized=True),
        build("tma_loop_ws8", desc_loop_kernel, loop, {"BM": 128, "BK": 64, "WS": True}, 8,
              descriptors=True, warp_specialized=True),
        build("pointers_as_tma", pointer_matmul_kernel, plain, {"BM": 64}, 4, descriptors=True),
    ]  # fmt: skip
