"""Triton elementwise kernels for the MLP activations (fp32 math, stored in the input dtype).

Plain functions, ``triton.jit``-wrapped on first use by ``triton_activation.py`` (see
``_triton_attention_kernels.py`` for why). Tensors are contiguous and flattened; the bias is
broadcast along the last dim of size ``H``. Triton has no ``tanh``: ``tanh(u) = 2 sigmoid(2u) - 1``.
Keep ``tl.constexpr`` constants on the right of tensor arithmetic (``z * K``, not ``K * z``):
``constexpr.__mul__`` would wrap the tensor in a constexpr.
"""

import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_K = tl.constexpr(0.044715)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def bias_gelu_fwd_kernel(X, B, Y, N, H, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(B + offs % H, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        u = tl.minimum(tl.maximum((z + z * z * z * GELU_K) * SQRT_2_OVER_PI, -15.0), 15.0)
        t = 2.0 * tl.sigmoid(u * 2.0) - 1.0  # tanh(u); |u| <= 15 keeps exp finite, tanh(15) == 1 in fp32
        y = 0.5 * z * (1.0 + t)
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT2))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def bias_gelu_bwd_kernel(DY, X, B, DX, N, H, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(B + offs % H, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        u = tl.minimum(tl.maximum((z + z * z * z * GELU_K) * SQRT_2_OVER_PI, -15.0), 15.0)
        t = 2.0 * tl.sigmoid(u * 2.0) - 1.0  # tanh(u); |u| <= 15 keeps exp finite, tanh(15) == 1 in fp32
        dz = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + z * z * GELU_K * 3.0)
    else:
        dz = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    tl.store(DX + offs, (dy * dz).to(DX.dtype.element_ty), mask=mask)


def silu_mul_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


def silu_mul_bwd_kernel(DY, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
