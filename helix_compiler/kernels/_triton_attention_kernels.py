"""Triton FlashAttention-2 kernels (forward writing lse, backward consuming it).

Plain functions, *not* decorated: ``triton_attention.py`` wraps them with ``triton.jit`` on
first use, so that whether they run compiled (CUDA) or in Triton's interpreter (CPU tensors,
``TRITON_INTERPRET=1``) is decided when they are used, not when this module is imported.
No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.

Layout ``[batch, heads, seq, head_dim]`` with arbitrary strides. GQA: the program for query
head ``h`` reads K/V head ``h // GROUPS``; the dK/dV program of one K/V head loops over its
``GROUPS`` query heads, so repeated K/V are never materialized and dK/dV need no reduction.
Causal masks are top-left aligned (query i sees keys 0..i), as SDPA's ``is_causal``.
Sliding windows (``HAS_LEFT``/``HAS_RIGHT``, sizes ``WL``/``WR``): query i sees keys
``i - WL <= j <= i + WR``; the loops start and stop at the first/last block that touches the
band (blocks entirely outside it are never loaded) and the band's edges are masked inside.
A row may then meet fully masked blocks before its first visible key: the running max is kept
finite (``m_safe``) so that such blocks contribute exp2(-inf) = 0, and rows that see no key
at all get out 0, lse -inf.
Documents (``HAS_DOCS``): ``DOC`` holds the ``[batch, seq]`` int32 document id per token
(``seq_q == seq_k``), ``DSTART``/``DEND`` (same strides ``sib, sis``) the row positions of the
first token and one past the last token of each token's document. Query i sees key j only if
``DOC[i] == DOC[j]`` (masked inside the blocks, with causal and window). As documents are
contiguous runs, the loops are also bounded: a query block only visits keys from the start of
its first row's document to the end of its last row's document, a key block only the query
rows from the start of its first key's document to the end of its last key's document.
Scores are kept in base 2 (``qk * scale * log2(e)``, ``exp2``); the stored lse is natural-log.

``UPCAST`` converts every loaded tile to fp32: required in the interpreter, whose ``tl.dot``
on bf16 operands is wrong, and used for fp32 inputs. On GPU half inputs stay half for the
tensor cores (P and dS are cast to the input dtype before their GEMMs, as FlashAttention does).
"""

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def attn_fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    slb, slh, sls,
    H, SQ, SK, D, qk_scale,  # qk_scale = softmax scale * log2(e)
    WL, WR,
    DOC, DSTART, DEND, sib, sis,  # document ids / spans [b, s] (HAS_DOCS only)
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < SQ
    d_valid = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = 0
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, start_m + BLOCK_M)
    if HAS_LEFT:
        lo = (tl.maximum(0, start_m - WL) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M + WR)
    if HAS_DOCS:
        doc_base = b * sib
        doc_q = tl.load(DOC + doc_base + offs_m * sis, mask=m_valid, other=-1)
        # keys of the documents of rows start_m .. last_m only (documents are contiguous runs)
        last_m = tl.minimum(start_m + BLOCK_M, SQ) - 1
        lo = tl.maximum(lo, (tl.load(DSTART + doc_base + start_m * sis) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, tl.load(DEND + doc_base + last_m * sis))
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < SK
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        if HAS_LEFT:
            valid = valid & (cols[None, :] >= offs_m[:, None] - WL)
        if HAS_RIGHT:
            valid = valid & (cols[None, :] <= offs_m[:, None] + WR)
        if HAS_DOCS:
            doc_k = tl.load(DOC + doc_base + cols * sis, mask=n_valid, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row has seen no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             acc.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m * sls, lse.to(LSE.dtype.element_ty), mask=m_valid)


def attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    sob, soh, sos, sod,
    sdb, sdh, sds, sdd,
    seb, seh, ses,
    H, SQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = rowsum(dP * P) of the softmax backward.
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < SQ)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * seb + h * seh + offs_m * ses, tl.sum(o * do, 1), mask=offs_m < SQ)


def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdb, sdh, sds, sdd,
    slb, slh, sls,  # shared by LSE and DELTA (both allocated [b, h, s] contiguous)
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    HKV, SQ, SK, D, sm_scale, qk_scale,
    WL, WR,
    DOC, DSTART, DEND, sib, sis,  # document ids / spans [b, s] (HAS_DOCS only)
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < SK
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    hi = SQ
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # first query block with a row >= start_n
    if HAS_RIGHT:  # rows i >= start_n - WR
        lo = tl.maximum(lo, (tl.maximum(0, start_n - WR) // BLOCK_M) * BLOCK_M)
    if HAS_LEFT:  # rows i <= (start_n + BLOCK_N - 1) + WL
        hi = tl.minimum(SQ, start_n + BLOCK_N + WL)
    if HAS_DOCS:
        doc_base = b * sib
        doc_k = tl.load(DOC + doc_base + offs_n * sis, mask=n_valid, other=-2)
        # query rows of the documents of keys start_n .. last_n only
        last_n = tl.minimum(start_n + BLOCK_N, SK) - 1
        lo = tl.maximum(lo, (tl.load(DSTART + doc_base + start_n * sis) // BLOCK_M) * BLOCK_M)
        hi = tl.minimum(hi, tl.load(DEND + doc_base + last_n * sis))
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        l_base = LSE + b * slb + h * slh
        e_base = DELTA + b * slb + h * slh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < SQ
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=q_mask,
                        other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=q_mask,
                         other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(l_base + offs_m * sls, mask=m_valid, other=0.0).to(tl.float32)
            delta = tl.load(e_base + offs_m * sls, mask=m_valid, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            valid = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            if HAS_LEFT:
                valid = valid & (offs_n[None, :] >= offs_m[:, None] - WL)
            if HAS_RIGHT:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + WR)
            if HAS_DOCS:
                doc_q = tl.load(DOC + doc_base + offs_m * sis, mask=m_valid, other=-1)
                valid = valid & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(valid, tl.math.exp2(qk * qk_scale - lse[:, None] * LOG2E),
                         0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdb, sdh, sds, sdd,
    slb, slh, sls,
    sdqb, sdqh, sdqs, sdqd,
    H, SQ, SK, D, sm_scale, qk_scale,
    WL, WR,
    DOC, DSTART, DEND, sib, sis,  # document ids / spans [b, s] (HAS_DOCS only)
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUPS

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < SQ
    d_valid = offs_d < D
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * slb + h * slh + offs_m * sls, mask=m_valid, other=0.0).to(tl.float32)
    delta = tl.load(DELTA + b * slb + h * slh + offs_m * sls, mask=m_valid, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = 0
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, start_m + BLOCK_M)
    if HAS_LEFT:
        lo = (tl.maximum(0, start_m - WL) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M + WR)
    if HAS_DOCS:
        doc_base = b * sib
        doc_q = tl.load(DOC + doc_base + offs_m * sis, mask=m_valid, other=-1)
        # keys of the documents of rows start_m .. last_m only (documents are contiguous runs)
        last_m = tl.minimum(start_m + BLOCK_M, SQ) - 1
        lo = tl.maximum(lo, (tl.load(DSTART + doc_base + start_m * sis) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, tl.load(DEND + doc_base + last_m * sis))
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < SK
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        valid = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        if HAS_LEFT:
            valid = valid & (cols[None, :] >= offs_m[:, None] - WL)
        if HAS_RIGHT:
            valid = valid & (cols[None, :] <= offs_m[:, None] + WR)
        if HAS_DOCS:
            doc_k = tl.load(DOC + doc_base + cols * sis, mask=n_valid, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        p = tl.where(valid, tl.math.exp2(qk * qk_scale - lse[:, None] * LOG2E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
