"""Integer GEMV over quantized blocks: weight codes times activation codes with ``dp4a``.

The decode-time GEMM of a quantized expert (few tokens per expert) reads
each weight once; what limits it is the work per weight.  Unpacking every
weight to float32 and multiplying in float costs about a dozen
instructions per weight.  Here the weight codes stay bytes: a decoder's
``codes4`` masks four of them into one word (one or two logic operations),
and ``dp4a`` multiplies them with four activation codes and adds, so a
weight costs about one instruction per token.

The activations come as 16-bit codes in two byte planes (:mod:`.actquant`):
per weight segment (16 columns sharing ``a_s``, ``b_s``: one activation
group, of scale ``d``) and token, ::

    acc  = sum_i w_i * hi_i                  dp4a chain over the segment's words
    acc  = (acc << 8) + sum_i w_i * lo_i     second chain, started from the first
    dot += a_s * (d * acc + c * r)  -  b_s * s

with ``d``, ``s``, ``r`` of the segment's columns (one 16-byte load, see
:mod:`.actquant`) and ``c`` the type's ``codes_center``: the error is then
that of codes ``w - c``, half the range of ``w``.  ``acc`` fits int32:
``|w| <= 127``, ``|hi|, |lo| <= 128``, 16 values.

Grid and lanes as the float GEMV of :mod:`.gemm`: grid ``(expert slot, row
block, token split)``, a group of ``segw`` lanes owns a weight row (gate and
up, or two consecutive rows), lane ``i`` of a group walks chunks ``i, i +
segw, ...`` and uses each chunk for the ``nt`` tokens of a pass.  A Q6_K
chunk's segments are 8 columns; there a lane's unit is two chunks
(:func:`uses_pairs`), whose segments ``s`` make one 16-column segment, and
lane ``i`` walks chunk pairs ``i, i + segw, ...``.  The activation codes
are read straight from global memory (a few KiB a token, read by every row
group: they stay in L1); the next unit's weights are loaded before the
current one is used, to keep loads in flight.
"""
from __future__ import annotations

from numba import cuda, float32, int64, uint32

from .actquant import quantize_groups
from .decoders import QInfo
from .gemm import GEMV_MAX_THREADS, gemv_head, gemv_store
from .primitives import dp4a, load4, seg_sum, shared_load4, silu
from .primitives import kernel as kernel_jit

__all__ = ["qgemv_kernel", "min_blocks", "shared_bytes", "quantize_fits", "uses_pairs"]

_cache = {}


def qgemv_kernel(qi: QInfo, gate_up: bool, nt: int, by_pair: bool = False,
                 quantize: bool = False):
    """The integer GEMV kernel for quantized weights of type ``qi`` (``qi.codes4``
    set), ``nt`` tokens a pass.

    Signature::

        kernel[(n_expert_slots, row_blocks, token_splits), 32 * warps, stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw,
            xq, xa, num_slots, active, meta, offsets, packed_token_idx, out)

    As :func:`numba_moe.cuda.gemm.gemv_kernel` (``segw``, ``warps``,
    ``row_blocks`` from :func:`~numba_moe.cuda.gemm.gemv_layout`, with
    ``pairs=uses_pairs(qi)``), with the
    activations as ``xq`` uint32 / ``xa`` float32 of
    :mod:`numba_moe.cuda.actquant` (rows of ``n_chunks * 32`` values) in
    place of ``x``; ``by_pair`` as there; no shared memory.  ``quantize``
    (``by_pair`` in plain mode): ``xq`` is the float32 rows ``x`` instead
    (``xa`` unused) and each block quantizes its slot's row into ``n_chunks *
    160`` bytes of dynamic shared memory (:func:`shared_bytes`), which saves
    the quantization's launch between the two GEMVs of a decode step.
    """
    assert not quantize or (by_pair and not gate_up)
    key = (qi.qtype, gate_up, nt, min_blocks(gate_up, nt), by_pair, quantize)
    if key not in _cache:
        _cache[key] = _make(qi, gate_up, nt, *key[3:], uses_pairs(qi))
    return _cache[key]


def uses_pairs(qi: QInfo) -> bool:
    """Whether a lane's unit is two chunks (``qi.fetch2``: Q6_K) rather than one.

    Two Q6_K chunks fill 16-column activation groups: one ``dp4a`` chain, one
    scale load and one float epilogue a group instead of two, and 16-byte
    weight loads instead of 8-byte ones.  Down phase (H100, Qwen3-30B-A3B
    layer, one chunk / two a unit): T=1 9.5 / 7.0 us, T=4 23.0 / 21.4, T=16
    71.8 / 68.1.  Q4_K chunk pairs (one header and one set of sub-block
    scales for two chunks, 30 % fewer instructions) made the gate / up phase
    slower instead: T=1 8.4 / 13.2 us, T=16 95.2 / 166.8 (a lane's two
    16-byte loads, 32 bytes apart across lanes, against one 16-byte load
    contiguous across lanes).
    """
    return qi.fetch2 is not None


def shared_bytes(quantize: bool, n_chunks: int) -> int:
    """Dynamic shared memory of a launch: the codes of one row (8 words and
    12 scales a 16-column group) where the blocks quantize their rows."""
    return n_chunks * 2 * 20 * 4 if quantize else 0


def quantize_fits(n_chunks: int) -> bool:
    """Whether the blocks can quantize rows of ``n_chunks`` chunks: their codes
    fit the 48 KiB of shared memory a block gets without opting in (rows up
    to 9824 values; Mixtral's 14336 do not)."""
    return shared_bytes(True, n_chunks) <= 48 << 10


def min_blocks(gate_up: bool, nt: int) -> int:
    """Register budget of the kernel (256-thread blocks a multiprocessor must
    fit): ``CUDA_LAUNCH.gemv_gate_up_min_blocks`` for gate / up one token a
    pass, else ``CUDA_LAUNCH.gemv_min_blocks``."""
    from ..config import CUDA_LAUNCH

    if gate_up and nt == 1:
        return CUDA_LAUNCH.gemv_gate_up_min_blocks
    return CUDA_LAUNCH.gemv_min_blocks


def _source(nseg: int, seglen: int, gate_up: bool, nt: int, center: int,
            has_offset: bool, by_pair: bool, quantize: bool, pairs: bool) -> str:
    """Python source of the kernel, its segment / word / token loops written
    out (as in :func:`numba_moe.cuda.gemm._gemv_source`: rolled, LLVM keeps
    the decoders' word choices as run-time selects)."""
    # a segment is 4 code words: 16-value segments, or two chunks' 8-value ones
    assert seglen == 16 or (pairs and seglen == 8)
    # quantize: xq holds float rows, quantized by each block into shared
    # memory (the codes of the slot's row: sq words, sa2 scales)
    load = "shared_load4" if quantize else "load4"
    toks = range(nt)
    lines = []
    emit = lines.append
    second = "va, vb, vc, vd" if gate_up else "wa, wb, wc, wd"
    emit("""
def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw,
           xq, xa, num_slots, active, meta, offsets, packed, out):""")
    emit(gemv_head(gate_up, by_pair))
    if quantize:
        emit("""    sq = cuda.shared.array(0, uint32)
    sa = cuda.shared.array(0, float32)
    sa2 = sa[n_chunks * 16:]
    xrow = xq[int64(j) * n_chunks * 32:int64(j + 1) * n_chunks * 32]""")
    emit(f"""    groups = n_chunks * 2
    ab = cuda.local.array(16, float32)
    for pa in range(start + cuda.blockIdx.z * {nt}, end, {nt} * cuda.gridDim.z):""")
    for t in toks:
        src = f"packed[min(pa + {t}, end - 1)]" if gate_up else f"min(pa + {t}, end - 1)"
        src = "int64(0)" if quantize else f"int64({src}) * groups"
        emit(f"""        xg{t} = {src}
        g{t} = float32(0)
        u{t} = float32(0)""")
    # two register sets for the weights in flight, used in turn (the body
    # written twice): no moves of the prefetched words, for down
    # projections one token a pass (H100, Q6_K down: T=16 94 -> 85 us;
    # slower for gate / up and for two tokens a pass)
    pingpong = not gate_up and nt == 1
    sets = ("A", "B") if pingpong else ("A",)
    # pairs: a lane's unit is two chunks (even, odd) read by ``fetch2``
    step = 2 if pairs else 1
    fetch = "fetch2" if pairs else "fetch"
    emit(f"""        c = {step} * lis
        cn = min(c, n_chunks - {step})
        A0 = {fetch}(wa, wb, wc, wd, row0, cn, nb)
        A1 = {fetch}({second}, row1, cn, nb)""")
    if quantize:
        # after the first weight loads: their latency overlaps the quantization
        emit("""        quantize_groups(xrow, tid, nthreads, groups, sq, sa2)
        cuda.syncthreads()""")
    emit("""        while c < n_chunks:""")
    ind = " " * 12
    for k, cur in enumerate(sets):
        nxt = sets[(k + 1) % len(sets)]
        if k:
            emit(f"{ind}if c >= n_chunks:\n{ind}    break")
        emit(f"""{ind}cn = min(c + {step} * segw, n_chunks - {step})""")
        if pingpong:
            emit(f"""{ind}{nxt}0 = {fetch}(wa, wb, wc, wd, row0, cn, nb)
{ind}{nxt}1 = {fetch}({second}, row1, cn, nb)
{ind}raw0 = {cur}0
{ind}raw1 = {cur}1""")
        else:
            emit(f"""{ind}raw0 = A0
{ind}raw1 = A1
{ind}A0 = {fetch}(wa, wb, wc, wd, row0, cn, nb)
{ind}A1 = {fetch}({second}, row1, cn, nb)""")
        if pairs:
            _pair_body(emit, ind, nseg, load, toks, center, has_offset, quantize)
        else:
            _body(emit, ind, nseg, load, toks, center, has_offset, quantize)
        emit(f"{ind}c += {step} * segw")
    emit(gemv_store(nt, gate_up))
    return "\n".join(lines) + "\n"


def _body(emit, ind, nseg, load, toks, center, has_offset, quantize):
    """One chunk of the loop: the weight words ``raw0``, ``raw1`` of chunk
    ``c`` against each token of the pass."""
    emit(f"{ind}affine(raw0, c, ab, 0)\n{ind}affine(raw1, c, ab, 8)")
    for sg in range(nseg):
        emit(f"{ind}grp = seg_col(c, {sg}) >> 4")
        for v in range(4):
            emit(f"{ind}p{v} = codes4(raw0, c, {v}, {sg})")
            emit(f"{ind}q{v} = codes4(raw1, c, {v}, {sg})")
        for t in toks:
            _segment(emit, ind, t, sg, load, center, has_offset, quantize)


def _pair_body(emit, ind, nseg, load, toks, center, has_offset, quantize):
    """One unit of the loop in pair mode: chunks ``c`` and ``c + 1`` (raws
    ``raw0``, ``raw1``: tuples of the two chunks' raws) against each token.

    The two chunks share their affine terms, and their segments ``s`` (8
    columns each) are the two halves of one 16-column activation group: one
    segment of four words, as a Q4_K chunk's.
    """
    emit(f"{ind}ra0, rb0 = raw0\n{ind}ra1, rb1 = raw1")
    emit(f"{ind}affine(ra0, c, ab, 0)\n{ind}affine(ra1, c, ab, 8)")
    for sg in range(nseg):
        emit(f"{ind}grp = seg_col(c, {sg}) >> 4")
        for k, (rw, cc, v) in enumerate((("a", "c", 0), ("a", "c", 1), ("b", "c + 1", 0),
                                         ("b", "c + 1", 1))):
            emit(f"{ind}p{k} = codes4(r{rw}0, {cc}, {v}, {sg})")
            emit(f"{ind}q{k} = codes4(r{rw}1, {cc}, {v}, {sg})")
        for t in toks:
            _segment(emit, ind, t, sg, load, center, has_offset, quantize)


def _segment(emit, ind, t, sg, load, center, has_offset, quantize):
    """Token ``t`` against the weight codes ``p0..p3`` (gate or first row)
    and ``q0..q3`` of segment ``sg``, the 16 columns of activation group
    ``grp``, into ``g{t}``, ``u{t}``."""
    codes, scales = ("sq", "sa2") if quantize else ("xq", "xa")
    emit(f"{ind}h0, h1, h2, h3 = {load}({codes}, (xg{t} + grp) * 8)")
    emit(f"{ind}l0, l1, l2, l3 = {load}({codes}, (xg{t} + grp) * 8 + 4)")
    emit(f"{ind}d, xs, xr, _ = {load}({scales}, (xg{t} + grp) * 12)")
    for acc, w in (("ag", "p"), ("au", "q")):
        emit(f"{ind}{acc} = dp4a({w}0, h0, 0)")
        for v in range(1, 4):
            emit(f"{ind}{acc} = dp4a({w}{v}, h{v}, {acc})")
        emit(f"{ind}{acc} = dp4a({w}0, l0, {acc} << 8)")
        for v in range(1, 4):
            emit(f"{ind}{acc} = dp4a({w}{v}, l{v}, {acc})")
    cr = f" + float32({center}) * xr" if center else ""
    emit(f"{ind}g{t} += ab[{sg}] * (d * float32(ag){cr})")
    emit(f"{ind}u{t} += ab[{8 + sg}] * (d * float32(au){cr})")
    if has_offset:
        emit(f"{ind}g{t} -= ab[{4 + sg}] * xs")
        emit(f"{ind}u{t} -= ab[{12 + sg}] * xs")


def _make(qi: QInfo, gate_up: bool, nt: int, min_blocks: int, by_pair: bool, quantize: bool,
          pairs: bool):
    src = _source(qi.nseg, qi.seglen, gate_up, nt, qi.codes_center, qi.has_offset, by_pair,
                  quantize, pairs)
    ns = dict(cuda=cuda, float32=float32, int64=int64, uint32=uint32, fetch=qi.fetch,
              fetch2=qi.fetch2,
              affine=qi.affine, codes4=qi.codes4, seg_col=qi.seg_col, load4=load4,
              dp4a=dp4a, seg_sum=seg_sum, silu=silu, quantize_groups=quantize_groups,
              shared_load4=shared_load4)
    exec(compile(src, f"<qgemv {qi.qtype.name} gate_up={gate_up} nt={nt} by_pair={by_pair}"
                      f" quantize={quantize} pairs={pairs}>", "exec"), ns)
    return kernel_jit(launch_bounds=(GEMV_MAX_THREADS, min_blocks))(ns["kernel"])
