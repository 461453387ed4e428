"""Newton–Schulz orthogonalization, the update of the Muon optimizer, as batched Triton matmuls.

Muon replaces a momentum matrix G by (approximately) the nearest semi-orthogonal matrix U Vᵀ of
its SVD. Five steps of the quintic iteration

    X ← a X + (b A + c A²) X,   A = X Xᵀ,   (a, b, c) = (3.4445, -4.7750, 2.0315)

started from X = G / ‖G‖_F (so every singular value is at most 1) push the singular values into
roughly [0.7, 1.2], which is all Muon needs; it does not converge to exactly 1.

Three kernels make one step, all batched over a leading dimension (every matrix of one shape in
one launch) and all accumulating in fp32:

- ``_sym_gram_kernel`` computes ``alpha · Y Yᵀ + beta · Z``. ``Y Yᵀ`` is symmetric, so only the
  tiles on and below the diagonal are computed (a table lists them) and each program writes its
  tile and, off the diagonal, the transposed tile. It runs twice per step: A = X Xᵀ, then
  S = b A + c A² as ``c · A Aᵀ + b · A`` (A is symmetric, so A² = A Aᵀ and S is symmetric too).
- ``_ns_update_kernel`` computes the new X = a X + S X, a plain (M × M) · (M × N) product with the
  old X added in its epilogue.

Matrices are oriented so that rows ≤ cols (a tall matrix is transposed first, and back at the
end): A and S are then the small (rows × rows) side. On the GPU operands are bf16 and the products
run on the tensor cores; under the Triton interpreter, where bf16 arithmetic is wrong, every load
is upcast to fp32 first (``UPCAST``), so interpreter runs check the algorithm, not bf16 rounding.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from kernels._backend import INTERPRET, use_triton

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_STEPS = 5
DEFAULT_EPS = 1e-7  # torch.optim.Muon's: the norm is clamped to at least this


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a 128-row tile for large matrices, a
# 64-row one (more programs per matrix, still one warpgroup of tensor-core rows) below 1024 rows.
GPU_CONFIGS = {"large": (128, 128, 64, 8, 3), "small": (64, 64, 64, 4, 3)}
LARGE_FROM_ROWS = 1024
# The interpreter costs a few ms per (program × loop iteration) whatever the tile: small tiles
# let small test matrices cross tile boundaries and ragged edges.
INTERPRET_BLOCK = 32

# Buffers the kernels write; tests replace it to fill them with NaN first.
_new_buffer = torch.empty


@triton.jit
def _sym_gram_kernel(
    y_ptr,  # (B, M, K): the rows whose Gram matrix is formed
    z_ptr,  # (B, M, M): added with weight beta when HAS_Z (unused otherwise)
    out_ptr,  # (B, M, M): alpha * Y Yᵀ + beta * Z, both triangles written
    tiles_ptr,  # int32 (n_tiles, 2): tile (row block, column block) with row block >= column
    K,
    stride_yb,
    stride_ym,
    stride_ob,  # also Z's strides: Z and out are both contiguous (B, M, M)
    stride_om,
    alpha,
    beta,
    HAS_Z: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One tile on or below the diagonal of a symmetric product, mirrored across it.

    M is a multiple of BLOCK and K of BLOCK_K (the caller zero-pads), so nothing is masked.
    """
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    ti = tl.load(tiles_ptr + 2 * t)
    tj = tl.load(tiles_ptr + 2 * t + 1)
    rows_i = ti * BLOCK + tl.arange(0, BLOCK)
    rows_j = tj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    y_base = y_ptr + batch * stride_yb
    yi_ptrs = y_base + rows_i[:, None] * stride_ym + ks[None, :]
    yj_ptrs = y_base + rows_j[:, None] * stride_ym + ks[None, :]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        yi = tl.load(yi_ptrs)
        yj = tl.load(yj_ptrs)
        if UPCAST:
            yi = yi.to(tl.float32)
            yj = yj.to(tl.float32)
        acc = tl.dot(yi, tl.trans(yj), acc)
        yi_ptrs += BLOCK_K
        yj_ptrs += BLOCK_K

    offsets_ij = rows_i[:, None] * stride_om + rows_j[None, :]
    if HAS_Z:
        z = tl.load(z_ptr + batch * stride_ob + offsets_ij)
        acc = alpha * acc + beta * z.to(tl.float32)
    else:
        acc = alpha * acc
    out = acc.to(out_ptr.dtype.element_ty)
    out_base = out_ptr + batch * stride_ob
    tl.store(out_base + offsets_ij, out)
    if ti != tj:  # the mirror image above the diagonal: the same rounded values, transposed
        tl.store(out_base + rows_j[:, None] * stride_om + rows_i[None, :], tl.trans(out))


@triton.jit
def _ns_update_kernel(
    x_ptr,  # (B, M, N): the current iterate
    s_ptr,  # (B, M, M): b A + c A²
    out_ptr,  # (B, M, N): a X + S X
    M,
    N,
    stride_xb,  # also out's strides
    stride_xm,
    stride_sb,
    stride_sm,
    a,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M × BLOCK_N) tile of the next iterate; the old X is added in the epilogue.

    M is a multiple of BLOCK_M and BLOCK_K, N of BLOCK_N (the caller zero-pads).
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    n_col_tiles = N // BLOCK_N
    rows = (pid // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + batch * stride_xb
    s_ptrs = s_ptr + batch * stride_sb + rows[:, None] * stride_sm + ks[None, :]
    x_ptrs = x_base + ks[:, None] * stride_xm + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, M, BLOCK_K):
        s = tl.load(s_ptrs)
        x = tl.load(x_ptrs)
        if UPCAST:
            s = s.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(s, x, acc)
        s_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xm
    offsets = rows[:, None] * stride_xm + cols[None, :]
    acc = a * tl.load(x_base + offsets).to(tl.float32) + acc
    tl.store(out_ptr + batch * stride_xb + offsets, acc.to(out_ptr.dtype.element_ty))


def _config(device: torch.device, rows: int) -> tuple[int, int, int, int, int]:
    if device.type == "cpu" and INTERPRET:
        return INTERPRET_BLOCK, INTERPRET_BLOCK, INTERPRET_BLOCK, 1, 1
    return GPU_CONFIGS["large" if rows >= LARGE_FROM_ROWS else "small"]


def padded_shape(rows: int, cols: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) rounded up to the tiles the kernels take for such a matrix on ``device``.

    Zero rows and columns do not change the iteration (they stay zero in X, A and S and add
    nothing to the products), so any shape runs mask-free kernels on a zero-padded copy.
    """
    block_m, block_n, block_k, _, _ = _config(device, rows)
    step_m = max(block_m, block_k)
    step_n = max(block_n, block_k)
    return triton.cdiv(rows, step_m) * step_m, triton.cdiv(cols, step_n) * step_n


@functools.lru_cache(maxsize=64)
def _lower_tiles(n_blocks: int, device: torch.device) -> torch.Tensor:
    """(row block, column block) of every tile on or below the diagonal, kept on the device."""
    tiles = [(i, j) for i in range(n_blocks) for j in range(i + 1)]
    return torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 2)


def _check_padded(x: torch.Tensor, rows: int, what: str) -> None:
    want = padded_shape(rows, x.shape[-1], x.device)
    if tuple(x.shape[-2:]) != want or not x.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous (B, {want[0]}, {want[1]}) tensor, got "
                         f"{tuple(x.shape)}; zero-pad it to padded_shape()")  # fmt: skip


def sym_gram(
    y: torch.Tensor,
    z: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    out: torch.Tensor | None = None,
    *,
    rows: int | None = None,
) -> torch.Tensor:
    """``alpha * y @ yᵀ + beta * z`` for a zero-padded (B, M, K) ``y``, by the triangle kernel.

    ``rows``: the row count the padding was chosen for (the tile choice), ``M`` by default.
    """
    batch, padded_rows, inner = y.shape
    rows = padded_rows if rows is None else rows
    _check_padded(y, rows, "sym_gram")
    if out is None:
        out = _new_buffer((batch, padded_rows, padded_rows), dtype=y.dtype, device=y.device)
    block, _, block_k, num_warps, num_stages = _config(y.device, rows)
    tiles = _lower_tiles(padded_rows // block, y.device)
    _sym_gram_kernel[(tiles.shape[0], batch)](
        y,
        z if z is not None else out,
        out,
        tiles,
        inner,
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        float(alpha),
        float(beta),
        HAS_Z=z is not None,
        UPCAST=INTERPRET,
        BLOCK=block,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def ns_update(
    x: torch.Tensor,
    s: torch.Tensor,
    a: float,
    out: torch.Tensor | None = None,
    *,
    rows: int | None = None,
) -> torch.Tensor:
    """``a * x + s @ x`` for a zero-padded (B, M, N) ``x`` and (B, M, M) ``s``."""
    batch, padded_rows, cols = x.shape
    rows = padded_rows if rows is None else rows
    _check_padded(x, rows, "ns_update")
    if out is None:
        out = _new_buffer(x.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, num_warps, num_stages = _config(x.device, rows)
    grid = ((padded_rows // block_m) * (cols // block_n), batch)
    _ns_update_kernel[grid](
        x,
        s,
        out,
        padded_rows,
        cols,
        x.stride(0),
        x.stride(1),
        s.stride(0),
        s.stride(1),
        float(a),
        UPCAST=INTERPRET,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def pad(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A zero-padded contiguous copy of a (B, M, N) batch, sized by :func:`padded_shape`."""
    batch, m, n = x.shape
    pm, pn = padded_shape(m if rows is None else rows, n, x.device)
    if (pm, pn) == (m, n):
        return x.contiguous()
    out = torch.zeros((batch, pm, pn), dtype=x.dtype, device=x.device)
    out[:, :m, :n] = x
    return out


def _kernel_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """bf16 on the GPU (the tensor-core path); fp32 too under the interpreter, where the kernels
    compute in fp32 anyway and an fp32 buffer checks them without bf16 rounding."""
    if device.type == "cpu" and INTERPRET:
        return (torch.bfloat16, torch.float32)
    return (torch.bfloat16,)


def _normalized(g: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``g / max(‖g‖_F, eps)`` per matrix, computed in fp32 (fp64 stays fp64), cast to ``dtype``."""
    work = g if g.dtype == torch.float64 else g.float()
    norm = torch.linalg.vector_norm(work, dim=(-2, -1), keepdim=True).clamp_min(eps)
    return (work / norm).to(dtype).contiguous()


def _iterate_torch(x: torch.Tensor, steps: int, coefficients) -> torch.Tensor:
    """The iteration in PyTorch ops in ``x.dtype``: the operations torch.optim.Muon uses."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        s = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, s, x, beta=a)
    return x


def _iterate_triton(x: torch.Tensor, steps: int, coefficients) -> torch.Tensor:
    a, b, c = coefficients
    batch, rows, cols = x.shape
    x = pad(x)
    padded_rows = x.shape[1]
    gram = _new_buffer((batch, padded_rows, padded_rows), dtype=x.dtype, device=x.device)
    s = _new_buffer((batch, padded_rows, padded_rows), dtype=x.dtype, device=x.device)
    spare = _new_buffer(x.shape, dtype=x.dtype, device=x.device)
    for _ in range(steps):
        sym_gram(x, out=gram, rows=rows)
        sym_gram(gram, gram, alpha=c, beta=b, out=s, rows=rows)
        x, spare = ns_update(x, s, a, out=spare, rows=rows), x
    return x[:, :rows, :cols]


def _orthogonalize(
    g: torch.Tensor, steps: int, coefficients, eps: float, dtype: torch.dtype, triton_path: bool
) -> torch.Tensor:
    if steps >= 100:
        raise ValueError("Newton-Schulz steps must be below 100")
    if g.dim() not in (2, 3):
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    single = g.dim() == 2
    x = g[None] if single else g
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = _normalized(x, eps, dtype)
    if triton_path and x.numel() > 0 and steps > 0:
        x = _iterate_triton(x, steps, tuple(float(v) for v in coefficients))
    else:
        x = _iterate_torch(x, steps, coefficients)
    if tall:
        x = x.mT
    return x[0] if single else x


def newton_schulz_reference(
    g: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The iteration in PyTorch ops, in ``dtype`` (``torch.float64`` for an exact reference)."""
    return _orthogonalize(g, steps, coefficients, eps, dtype, triton_path=False)


def newton_schulz(
    g: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The orthogonalized ``g`` ((M, N) or a (B, M, N) batch of one shape), in ``dtype``.

    Each matrix is divided by its Frobenius norm (at least ``eps``) in fp32, cast to ``dtype``
    and iterated ``steps`` times: by the kernels for bf16 (CUDA; bf16 or fp32 under the
    interpreter), by PyTorch matmuls otherwise. A batch with more rows than
    columns is transposed for the iteration and the result transposed back (a view).
    """
    triton_path = use_triton(g, backend) and dtype in _kernel_dtypes(g.device)
    return _orthogonalize(g, steps, coefficients, eps, dtype, triton_path)


def sm90_builds() -> list[dict[str, Any]]:
    """Every compile the GPU path can launch: both tile configs, bf16 operands."""
    builds = []
    for config, (block_m, block_n, block_k, num_warps, num_stages) in GPU_CONFIGS.items():
        t = "*bf16"
        common = {"num_warps": num_warps, "num_stages": num_stages, "matrix": True}
        for has_z in (False, True):
            builds.append(
                {
                    "name": f"ns_gram{'_axpy' if has_z else ''}_{config}_bf16",
                    "fn": _sym_gram_kernel,
                    "signature": {
                        "y_ptr": t,
                        "z_ptr": t,
                        "out_ptr": t,
                        "tiles_ptr": "*i32",
                        "K": "i32",
                        "stride_yb": "i64",
                        "stride_ym": "i32",
                        "stride_ob": "i64",
                        "stride_om": "i32",
                        "alpha": "fp32",
                        "beta": "fp32",
                        "HAS_Z": "constexpr",
                        "UPCAST": "constexpr",
                        "BLOCK": "constexpr",
                        "BLOCK_K": "constexpr",
                    },
                    "constexprs": {
                        "HAS_Z": has_z,
                        "UPCAST": False,
                        "BLOCK": block_m,
                        "BLOCK_K": block_k,
                    },
                    # Padded sizes and strides are multiples of the tiles, as the launcher sees.
                    "divisible_by_16": ["y_ptr", "z_ptr", "out_ptr", "tiles_ptr", "K",
                                        "stride_yb", "stride_ym", "stride_ob", "stride_om"],
                    **common,
                }
            )  # fmt: skip
        builds.append(
            {
                "name": f"ns_update_{config}_bf16",
                "fn": _ns_update_kernel,
                "signature": {
                    "x_ptr": t,
                    "s_ptr": t,
                    "out_ptr": t,
                    "M": "i32",
                    "N": "i32",
                    "stride_xb": "i64",
                    "stride_xm": "i32",
                    "stride_sb": "i64",
                    "stride_sm": "i32",
                    "a": "fp32",
                    "UPCAST": "constexpr",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                    "BLOCK_K": "constexpr",
                },
                "constexprs": {
                    "UPCAST": False,
                    "BLOCK_M": block_m,
                    "BLOCK_N": block_n,
                    "BLOCK_K": block_k,
                },
                "divisible_by_16": ["x_ptr", "s_ptr", "out_ptr", "M", "N",
                                    "stride_xb", "stride_xm", "stride_sb", "stride_sm"],
                **common,
            }
        )  # fmt: skip
    return builds


__all__ = [
    "newton_schulz",
    "newton_schulz_reference",
    "ns_update",
    "pad",
    "padded_shape",
    "sm90_builds",
    "sym_gram",
]
