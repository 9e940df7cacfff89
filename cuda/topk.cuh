// Top-k memory attention (LfMemoryTopkParams): each query row's top_k memory entries by score
// q . k, selected on the GPU without a [queries x memory] score matrix, then attended and merged
// by log-sum-exp into the row's local result.
//
// Selection: one CTA of LF_TOPK_ROWS rows (4 warps of 16, the sm_80 mainloop's tiles and score
// policy) streams the memory's key tiles in index order. A score beating its row's threshold is
// appended to the row's LF_TOPK_CAP candidate slots in global memory (an 8-byte key: the score's
// order bits over the complement of the index, so a larger key is a larger score or, at equal
// scores, a lower index). When a row's count passes LF_TOPK_CAP - LF_TOPK_KEYS, its warp
// compacts them: it finds the k-th largest key bit by bit (warp-wide counts, no sort), keeps the
// top_k in any order and raises the threshold to the k-th score. That is exact: an entry not
// above the threshold has top_k entries of at least its score and lower indices, since every
// later entry has a higher index than all kept ones. After the last tile the kept entries are
// sorted once (a bitonic sort in registers). With scores of random data few entries beat the
// threshold once it settles (about top_k * ln(n / top_k) for n entries); a memory whose scores
// rise with the index compacts every few tiles. cuda/topk_sm90.cuh is the same selection with
// Hopper's wgmma scores.
#pragma once

#include "sm80/mainloop.cuh"

namespace lf {

// 8-byte candidate key of score s (+0 and -0 made equal) at entry j; 0 is below every key.
__device__ __forceinline__ unsigned long long topk_key(float s, int j) {
    uint32_t u = __float_as_uint(s + 0.0f);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (static_cast<unsigned long long>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}
__device__ __forceinline__ float topk_score(unsigned long long key) {
    uint32_t u = static_cast<uint32_t>(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    return __uint_as_float(u);
}
__device__ __forceinline__ int topk_index(unsigned long long key) {
    return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
}

// One compare-exchange stage of a bitonic network over the warp's 32 * E keys (element i of
// lane l is position 32 * i + l): blocks of SIZE positions, partners STRIDE apart, descending
// where position & SIZE is 0. Compile-time stages keep every key in a register.
template <int E, int SIZE, int STRIDE>
__device__ __forceinline__ void bitonic_stage(unsigned long long (&v)[E], int lane) {
    if constexpr (STRIDE >= 32) {
        constexpr int si = STRIDE / 32;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            if ((i & si) == 0) {
                const bool desc = ((32 * i + lane) & SIZE) == 0;
                const unsigned long long a = v[i], c = v[i | si];
                const bool swap = desc ? a < c : a > c;
                v[i] = swap ? c : a;
                v[i | si] = swap ? a : c;
            }
        }
    } else {
        const bool lower = (lane & STRIDE) == 0;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, v[i], STRIDE);
            const bool desc = ((32 * i + lane) & SIZE) == 0;
            const bool keep_max = lower == desc;
            const bool mine = keep_max ? v[i] >= other : v[i] <= other;
            v[i] = mine ? v[i] : other;
        }
    }
    if constexpr (STRIDE > 1) bitonic_stage<E, SIZE, STRIDE / 2>(v, lane);
}
template <int E, int SIZE>
__device__ __forceinline__ void bitonic_sizes(unsigned long long (&v)[E], int lane) {
    bitonic_stage<E, SIZE, SIZE / 2>(v, lane);
    if constexpr (SIZE < 32 * E) bitonic_sizes<E, SIZE * 2>(v, lane);
}
// Sorts the warp's 32 * E keys in descending order.
template <int E>
__device__ __forceinline__ void warp_sort_desc(unsigned long long (&v)[E], int lane) {
    bitonic_sizes<E, 2>(v, lane);
}

constexpr int kTopkSlotsPerLane = LF_TOPK_CAP / 32;
// Slots per lane of the final sort: every kept entry (at most LF_TOPK_MAX_K) in one network.
constexpr int kTopkOutPerLane = LF_TOPK_MAX_K / 32;

// Loads a row's first n candidates (the rest as 0) into E keys per lane.
template <int E>
__device__ __forceinline__ void topk_load(unsigned long long (&v)[E], const unsigned long long *cand,
                                          int n, int lane) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const int pos = 32 * i + lane;
        v[i] = pos < n ? cand[pos] : 0ull;
    }
}

// The k-th largest of the warp's keys (distinct but for 0s, at least k of them nonzero; every
// nonzero key's high word is nonzero). Found bit by bit, without sorting: first the largest
// high word h with at least k keys at or above it, then, among the keys of high word h, the
// (k - keys above h)-th largest low word (the smallest one when that takes them all, the usual
// case: scores rarely tie).
template <int E>
__device__ __forceinline__ unsigned long long warp_kth_key(const unsigned long long (&v)[E], int k) {
    // The answer lies between the smallest and the largest nonzero high word, so it has their
    // common leading bits: the search starts below them (scores of one row mostly share their
    // sign, exponent and leading mantissa bits).
    uint32_t h_min = 0xffffffffu, h_max = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const uint32_t h = static_cast<uint32_t>(v[i] >> 32);
        if (h != 0) h_min = min(h_min, h);
        h_max = max(h_max, h);
    }
    h_min = __reduce_min_sync(0xffffffffu, h_min);
    h_max = __reduce_max_sync(0xffffffffu, h_max);
    const uint32_t diff = h_min ^ h_max;
    const int top = diff == 0 ? -1 : 31 - __clz(diff); // the highest bit they differ in
    uint32_t hi = top < 0 ? h_min : h_min & ~((2u << top) - 1u);
#pragma unroll 1
    for (int b = top; b >= 0; --b) {
        const uint32_t t = hi | (1u << b);
        int c = 0;
#pragma unroll
        for (int i = 0; i < E; ++i) c += static_cast<uint32_t>(v[i] >> 32) >= t;
        if (static_cast<int>(__reduce_add_sync(0xffffffffu, c)) >= k) hi = t;
    }
    int above = 0, eq = 0;
    uint32_t lo_min = 0xffffffffu;
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const uint32_t h = static_cast<uint32_t>(v[i] >> 32);
        above += h > hi;
        eq += h == hi;
        if (h == hi) lo_min = min(lo_min, static_cast<uint32_t>(v[i]));
    }
    const int need = k - static_cast<int>(__reduce_add_sync(0xffffffffu, above));
    uint32_t lo;
    if (static_cast<int>(__reduce_add_sync(0xffffffffu, eq)) == need) {
        lo = __reduce_min_sync(0xffffffffu, lo_min);
    } else {
        lo = 0;
#pragma unroll 1
        for (int b = 31; b >= 0; --b) {
            const uint32_t t = lo | (1u << b);
            int c = 0;
#pragma unroll
            for (int i = 0; i < E; ++i)
                c += static_cast<uint32_t>(v[i] >> 32) == hi && static_cast<uint32_t>(v[i]) >= t;
            if (static_cast<int>(__reduce_add_sync(0xffffffffu, c)) >= need) lo = t;
        }
    }
    return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Writes the warp's keys at or above `kth` to cand[0, ...) in any order (a ballot scan);
// returns how many.
template <int E>
__device__ __forceinline__ int warp_keep_from(const unsigned long long (&v)[E],
                                              unsigned long long kth, unsigned long long *cand,
                                              int lane) {
    const unsigned below = (1u << lane) - 1u;
    int base = 0;
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const bool keep = v[i] >= kth;
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        if (keep) cand[base + __popc(ballot & below)] = v[i];
        base += __popc(ballot);
    }
    return base;
}

// A row's compaction: of its n candidates (n > k), keeps the k largest keys in cand[0, k) and
// returns the k-th largest. The stores of the kept keys may overwrite slots other lanes loaded:
// every lane loads before any stores (the count's reduction orders them).
__device__ __forceinline__ unsigned long long topk_compact(unsigned long long *cand, int n, int k,
                                                           int lane) {
    unsigned long long v[kTopkSlotsPerLane];
    topk_load(v, cand, n, lane);
    const unsigned long long kth = warp_kth_key(v, k);
    warp_keep_from(v, kth, cand, lane);
    return kth;
}

// A row's result after its last tile: of its n candidates, the min(n, k) largest by descending
// key (score descending, ties by ascending index), -1 past n, to out[0, k).
__device__ __forceinline__ void topk_finish(unsigned long long *cand, int n, int k, int32_t *out,
                                            int lane) {
    if (n > k) {
        topk_compact(cand, n, k, lane);
        n = k;
        __syncwarp();
    }
    unsigned long long v[kTopkOutPerLane];
    topk_load(v, cand, n, lane);
    warp_sort_desc<kTopkOutPerLane>(v, lane);
#pragma unroll
    for (int i = 0; i < kTopkOutPerLane; ++i) {
        const int pos = 32 * i + lane;
        if (pos < k) out[pos] = pos < n ? topk_index(v[i]) : -1;
    }
}

// Appends the scores of one key tile that beat their rows' thresholds to the rows' candidate
// slots. s holds the thread's accumulators of an m16 tile (rows g and g + 8 of its warp, columns
// 8 nt + 2 tq + c, entry j0 + 8 nt + c with j0 = the tile's first entry + 2 tq); count[r] and
// cand[r] are row r's count (shared) and slots. Few scores beat a settled threshold, but over a
// long memory some score of the warp's 16 rows does in most tiles (about 16 * BC * k / n of
// them after n entries), so the work goes where they are: each row's scores in groups of
// kTopkGroup column blocks, a group's maximum found first (a tree: fmaxf is exact), and the warp
// walks only the groups in which some lane has a score above its threshold.
constexpr int kTopkGroup = 4;
template <int NT>
__device__ __forceinline__ void topk_insert(const float (&s)[NT][4], const float (&th)[2],
                                            const bool (&row_ok)[2], int j0, int mem_len,
                                            const uint8_t *mask, int *const (&count)[2],
                                            unsigned long long *const (&cand)[2]) {
    constexpr int G = kTopkGroup, NG = NT / G;
    static_assert(NT % G == 0, "whole groups");
    bool hit[2][NG];
    bool any = false;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int q = 0; q < NG; ++q) {
            float m[G];
#pragma unroll
            for (int i = 0; i < G; ++i)
                m[i] = fmaxf(s[q * G + i][2 * r], s[q * G + i][2 * r + 1]);
#pragma unroll
            for (int w = 1; w < G; w *= 2)
#pragma unroll
                for (int i = 0; i + w < G; i += 2 * w) m[i] = fmaxf(m[i], m[i + w]);
            hit[r][q] = row_ok[r] && m[0] > th[r];
            any |= hit[r][q];
        }
    if (!__any_sync(0xffffffffu, any)) return;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int q = 0; q < NG; ++q) {
            if (!__any_sync(0xffffffffu, hit[r][q])) continue;
            if (!hit[r][q]) continue;
#pragma unroll
            for (int i = 0; i < G; ++i)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int nt = q * G + i;
                    const int j = j0 + nt * 8 + c;
                    const float x = s[nt][2 * r + c];
                    if (x > th[r] && j < mem_len && (mask == nullptr || __ldg(mask + j) != 0)) {
                        const int slot = atomicAdd(count[r], 1);
                        cand[r][slot] = topk_key(x, j);
                    }
                }
        }
}

// After key tile t of a query tile (with `last`, after its final one): the rows of the warp
// (16 from warp_row0, their counts and thresholds in shared memory) whose next tile of BC entries
// might not fit their slots keep their top k and raise their thresholds; with `last`, every row
// that exists writes its selection. q0: the query tile's first row, row0: its first row's index
// over (batch, head, row). Shared by the sm_80 and the Hopper selection kernels.
template <int BC>
__device__ __forceinline__ void topk_compact_rows(const LfMemoryTopkParams &p, int k, int *count,
                                                  float *threshold, int warp_row0, int q0,
                                                  int64_t row0, bool last, int lane) {
    const int n_lane = lane < 16 ? count[warp_row0 + lane] : 0;
    const bool pick = lane < 16 && (last ? q0 + warp_row0 + lane < p.seqlen_q
                                         : n_lane > LF_TOPK_CAP - BC);
    unsigned rows = __ballot_sync(0xffffffffu, pick);
    while (rows) {
        const int r = __ffs(rows) - 1;
        rows &= rows - 1;
        const int64_t grow = row0 + warp_row0 + r;
        unsigned long long *cand = p.cand + grow * LF_TOPK_CAP;
        const int n = __shfl_sync(0xffffffffu, n_lane, r);
        if (last) {
            // The selection, by descending score (ties: ascending index), -1 past the count.
            topk_finish(cand, n, k, p.indices + grow * k, lane);
            continue;
        }
        const float kth = topk_score(topk_compact(cand, n, k, lane));
        __syncwarp();
        if (lane == 0) {
            count[warp_row0 + r] = k;
            threshold[warp_row0 + r] = kth;
        }
        __syncwarp();
    }
}

template <class Tr> __device__ __forceinline__ void topk_select(const LfMemoryTopkParams &p) {
    static_assert(Tr::BR == LF_TOPK_ROWS && Tr::BC == LF_TOPK_KEYS && Tr::kMT == 1,
                  "one m16 tile of rows per warp");
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + Tr::kQBytes; // two buffers of Tr::kKVBytes
    int *count = reinterpret_cast<int *>(smem + Tr::kQBytes + 2 * Tr::kKVBytes);
    float *threshold = reinterpret_cast<float *>(count + Tr::BR);

    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_row0 = warp * 16;
    const int g = lane >> 2, tq = lane & 3;
    const int q0 = qt * Tr::BR;
    const int hk = h / (p.heads_q / p.heads_kv);
    const int k = p.top_k;
    const int mem_len = p.mem_len;
    const int64_t row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + q0;

    if (lane < 16) { // each warp owns its rows' counts and thresholds
        count[warp_row0 + lane] = 0;
        threshold[warp_row0 + lane] = -INFINITY;
    }
    __syncwarp();
    const uint16_t *q_ptr = static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride +
                            h * p.q_head_stride + q0 * p.q_row_stride;
    const uint16_t *k_ptr = static_cast<const uint16_t *>(p.mem_k) + b * p.mem_k_batch_stride +
                            hk * p.mem_k_head_stride;
    const uint8_t *mask = p.mem_mask ? p.mem_mask + static_cast<int64_t>(b) * mem_len : nullptr;
    const int n_tiles = (mem_len + Tr::BC - 1) / Tr::BC;
    load_rows<Tr, Tr::BR>(sQ, q_ptr, p.q_row_stride, p.seqlen_q - q0, p.head_dim, tid);
    if (n_tiles > 0)
        load_rows<Tr, Tr::BC>(sK, k_ptr, p.mem_k_row_stride, mem_len, p.head_dim, tid);
    cp_async_commit();

    // The thread's two accumulator rows (g and g + 8 of the warp's 16) and whether they exist.
    const bool row_ok[2] = {q0 + warp_row0 + g < p.seqlen_q, q0 + warp_row0 + g + 8 < p.seqlen_q};
    unsigned long long *const row_cand[2] = {p.cand + (row0 + warp_row0 + g) * LF_TOPK_CAP,
                                             p.cand + (row0 + warp_row0 + g + 8) * LF_TOPK_CAP};
    int *const row_count[2] = {count + warp_row0 + g, count + warp_row0 + g + 8};

    // Tile n_tiles loads nothing: every row of the warp then keeps its top k (all its candidates
    // when fewer) and writes them out, in the same code as the compactions.
    for (int t = 0; t <= n_tiles; ++t) {
        const bool last = t == n_tiles;
        if (!last) {
            cp_async_wait<0>();
            __syncthreads(); // tile t (and Q, the counts) visible; all done with tile t - 1
            if (t + 1 < n_tiles) {
                const int j1 = (t + 1) * Tr::BC;
                load_rows<Tr, Tr::BC>(sK + ((t + 1) & 1) * Tr::kKVBytes,
                                      k_ptr + j1 * p.mem_k_row_stride, p.mem_k_row_stride,
                                      mem_len - j1, p.head_dim, tid);
            }
            cp_async_commit();

            float s[1][Tr::kNT][4];
            PlainScore::compute<Tr>(s, sQ, sK + (t & 1) * Tr::kKVBytes, warp_row0, lane);
            const float th[2] = {threshold[warp_row0 + g], threshold[warp_row0 + g + 8]};
            topk_insert(s[0], th, row_ok, t * Tr::BC + 2 * tq, mem_len, mask, row_count,
                        row_cand);
        }
        __syncwarp();
        topk_compact_rows<Tr::BC>(p, k, count, threshold, warp_row0, q0, row0, last, lane);
    }
}

// The memory part of each row over its selected entries (one warp per row, lane c holding
// columns 4c..4c+3), merged into the row's local o and lse by log-sum-exp, as the merge kernel
// merges two passes (a weight of 0 lets no NaN or inf of an unused input through).
template <typename T> __device__ __forceinline__ void topk_attend(const LfMemoryTopkParams &p) {
    using Elt = Elem<T>;
    const int lane = threadIdx.x & 31;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
    if (row >= rows) return;
    const int i = static_cast<int>(row % p.seqlen_q);
    const int h = static_cast<int>((row / p.seqlen_q) % p.heads_q);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.seqlen_q) * p.heads_q));
    const int hk = h / (p.heads_q / p.heads_kv);
    const int c = 4 * lane;
    const bool active = c < p.head_dim;

    // Four elements as two packed registers (8 bytes; rows are at least 8-byte aligned).
    auto load4 = [&](const uint16_t *src) -> uint2 {
        return active ? *reinterpret_cast<const uint2 *>(src) : make_uint2(0u, 0u);
    };
    auto dot4 = [](const float (&a)[4], uint2 w) {
        const float2 lo = Elt::unpack(w.x), hi = Elt::unpack(w.y);
        return a[0] * lo.x + a[1] * lo.y + a[2] * hi.x + a[3] * hi.y;
    };
    float q[4];
    {
        const uint2 w = load4(static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride +
                              i * p.q_row_stride + h * p.q_head_stride + c);
        const float2 lo = Elt::unpack(w.x), hi = Elt::unpack(w.y);
        q[0] = lo.x;
        q[1] = lo.y;
        q[2] = hi.x;
        q[3] = hi.y;
    }
    const uint16_t *kb = static_cast<const uint16_t *>(p.mem_k) + b * p.mem_k_batch_stride +
                         hk * p.mem_k_head_stride + c;
    const uint16_t *vb = static_cast<const uint16_t *>(p.mem_v) + b * p.mem_v_batch_stride +
                         hk * p.mem_v_head_stride + c;
    const int32_t *sel = p.indices + row * p.top_k;

    constexpr int kBatch = 8;
    float m = -INFINITY, l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int e0 = 0; e0 < p.top_k; e0 += kBatch) {
        int j[kBatch];
        float s[kBatch];
        uint2 w[kBatch];
#pragma unroll
        for (int e = 0; e < kBatch; ++e) {
            j[e] = e0 + e < p.top_k ? __ldg(sel + e0 + e) : -1;
            // Indices come from the selection kernel; one out of range reads nothing.
            if (j[e] >= p.mem_len) j[e] = -1;
        }
#pragma unroll
        for (int e = 0; e < kBatch; ++e)
            w[e] = j[e] >= 0 ? load4(kb + j[e] * p.mem_k_row_stride) : make_uint2(0u, 0u);
#pragma unroll
        for (int e = 0; e < kBatch; ++e) {
            float d = dot4(q, w[e]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            s[e] = j[e] >= 0 ? d * p.softmax_scale_log2 : -INFINITY;
        }
        float mx = m;
#pragma unroll
        for (int e = 0; e < kBatch; ++e) mx = fmaxf(mx, s[e]);
        if (mx == -INFINITY) continue; // nothing selected here (selections end with -1s)
        const float corr = m == -INFINITY ? 0.f : exp2f(m - mx);
        l *= corr;
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[x] *= corr;
        m = mx;
#pragma unroll
        for (int e = 0; e < kBatch; ++e)
            w[e] = j[e] >= 0 ? load4(vb + j[e] * p.mem_v_row_stride) : make_uint2(0u, 0u);
#pragma unroll
        for (int e = 0; e < kBatch; ++e) {
            if (j[e] < 0) continue;
            const float pe = exp2f(s[e] - m);
            l += pe;
            const float2 lo = Elt::unpack(w[e].x), hi = Elt::unpack(w[e].y);
            acc[0] += pe * lo.x;
            acc[1] += pe * lo.y;
            acc[2] += pe * hi.x;
            acc[3] += pe * hi.y;
        }
    }

    // Merge (natural-log LSEs): the local part is in o and lse.
    const int64_t lse_i = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
    const float la = p.lse[lse_i];
    const float lb = m == -INFINITY ? -INFINITY : (m + log2f(l)) * 0.69314718055994531f;
    const float mxl = fmaxf(la, lb);
    float wa = 0.f, wb = 0.f, lse = -INFINITY;
    if (mxl != -INFINITY) {
        const float ea = __expf(la - mxl), eb = __expf(lb - mxl);
        const float sum = ea + eb;
        wa = ea / sum;
        wb = l > 0.f ? eb / (sum * l) : 0.f; // the memory part's 1 / l folded in
        lse = mxl + __logf(sum);
    }
    __syncwarp();
    if (lane == 0) p.lse[lse_i] = lse;
    if (!active) return;
    uint16_t *o = static_cast<uint16_t *>(p.o) + b * p.o_batch_stride + i * p.o_row_stride +
                  h * p.o_head_stride + c;
    const uint2 ow = load4(o);
    const float2 lo = Elt::unpack(ow.x), hi = Elt::unpack(ow.y);
    const float loc[4] = {lo.x, lo.y, hi.x, hi.y};
    float r[4];
#pragma unroll
    for (int x = 0; x < 4; ++x)
        r[x] = (wa > 0.f ? wa * loc[x] : 0.f) + (wb > 0.f ? wb * acc[x] : 0.f);
    *reinterpret_cast<uint2 *>(o) = make_uint2(Elt::pack(r[0], r[1]), Elt::pack(r[2], r[3]));
}

} // namespace lf

// The selection kernel for element type T at tile width D (PADDED: head dims narrower than D, a
// multiple of 4, zero-filled on load).
#define LF_DEFINE_TOPK_SELECT_KERNEL(NAME, T, D, PADDED)                                          \
    using NAME##_traits =                                                                         \
        lf::FwdTraits<T, D, LF_TOPK_ROWS, LF_TOPK_KEYS, 4, 1, PADDED>;                            \
    extern "C" __global__ void __launch_bounds__(128, 4) NAME(const __grid_constant__ LfMemoryTopkParams p) { \
        lf::topk_select<NAME##_traits>(p);                                                        \
    }

// The attention-and-merge kernel for element type T (any head dim up to 128, a multiple of 4).
#define LF_DEFINE_TOPK_ATTEND_KERNEL(NAME, T)                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(const __grid_constant__ LfMemoryTopkParams p) { \
        lf::topk_attend<T>(p);                                                                    \
    }
