// Tile primitives of the Hopper (sm_90a) mainloop: mbarriers, TMA tile loads, the shared-memory
// matrix descriptors of wgmma, warpgroup fences and register reallocation. Each is one PTX
// instruction or a short loop around one, so the mainloop reads as a composition of them.
#pragma once

#include <stdint.h>

#include "../common.cuh"

namespace lf {
namespace sm90 {

// ---- mbarriers (shared-memory transaction barriers) --------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the other threads and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives once and announces `bytes` of TMA transactions that complete the phase.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, so
// waiting for parity 1 returns at once (how a producer passes its first round of empty slots).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}

// ---- TMA ----------------------------------------------------------------------------------------

// Loads one box of a 4-D tensor map at element coordinates (c0, c1, c2, c3) into shared memory
// at `dst`, completing `bytes` on `bar`. `tmap` is the generic address of a __grid_constant__
// kernel parameter. Elements outside the tensor are written as zeros.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void *tmap, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(tmap)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}

// Loads rows [row, row + ROWS) of head `head`, batch entry `b` of a 4-D tensor map whose boxes are
// 64 columns by ROWS rows, from column `col` on (a multiple of 16 bytes): D / 64 boxes, column
// block c at dst + c * ROWS * 128 (Sw128Tile).
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const void *tmap, uint32_t bar, int row,
                                              int head, int b, int col = 0) {
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
        tma_load_4d(dst + c * ROWS * 128, tmap, bar, col + c * 64, row, head, b);
}

// Fetches the tensor map at generic address `tmap` (a __grid_constant__ parameter) into the
// descriptor cache, so that the first TMA load through it does not wait for the fetch.
__device__ __forceinline__ void prefetch_tmap(const void *tmap) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

// 32 bits of shared memory at `addr`, and 64 bits (two zeros) stored at `addr`.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ void sts64_zero(uint32_t addr) {
    asm volatile("st.shared.v2.b32 [%0], {%1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

// Orders this thread's ordinary shared-memory writes before later reads by the async proxy
// (wgmma operands, TMA).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- named barriers and register reallocation ---------------------------------------------------

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int N> __device__ __forceinline__ void regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- wgmma --------------------------------------------------------------------------------------

// Before the first wgmma of a batch: orders the registers it reads and accumulates into (written
// by ordinary instructions) before the asynchronous tensor-core reads.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// wgmma_wait<0>, but not before what precedes it in the source. ptxas schedules a wait as early
// as its basic block allows: in the overlapped schedule it put the wait for P V above the very
// softmax that was to run while P V did (SASS of 2026-12-02). So this wait sits behind a branch,
// which ends the block; `never` must be false in every thread, so that all warps of the
// warpgroup take the same arm, as the wait's .aligned requires. Both arms wait, with different
// text, so that no pass merges them back above the branch.
__device__ __forceinline__ void wgmma_wait_all_after(bool never) {
    if (__any_sync(0xffffffffu, never))
        asm volatile("{\n wgmma.wait_group.sync.aligned 0;\n}\n" ::: "memory");
    else
        wgmma_wait<0>();
}
// Keeps the compiler from moving reads or writes of an accumulator across an asynchronous
// wgmma that owns it.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N, int M> __device__ __forceinline__ void fence_regs(float (&r)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}
// The same for registers an asynchronous wgmma reads (A fragments): they stay live, and are not
// reused for other values, until after the wait that follows.
template <int N, int M> __device__ __forceinline__ void fence_regs(uint32_t (&r)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// A shared-memory matrix descriptor for the 128-byte-swizzled layout that TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B: rows of 64 16-bit elements (128 bytes), 8-row atoms of 1024 bytes.
//   K-major operand (Q, K): lbo unused (16), sbo = 1024 (the next 8 rows); a k16 step inside the
//     64 columns adds 32 bytes to the start address.
//   MN-major operand (V): lbo = bytes between 64-column blocks, sbo = 1024 (the next 8 keys).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
           (static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
           (static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// A descriptor moved `bytes` further into shared memory: the start-address field (bits 0-13, in
// 16-byte units) never carries into the next field, since shared addresses stay below 2^18
// bytes, so a 32-bit add on the low word does it (one instruction, not a rebuild).
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
    const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
    return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// A [ROWS][D] tile of 16-bit elements as TMA writes it with 128-byte swizzle and boxes of 64
// columns: D / 64 column blocks of ROWS * 128 bytes each; in a block, row r is 128 bytes at
// r * 128 whose 16-byte chunk c is stored at chunk c ^ (r & 7). The block bases must be 1024-byte
// aligned.
template <int ROWS, int D> struct Sw128Tile {
    static_assert(D % 64 == 0, "column blocks of 64 elements");
    static constexpr int kBlockBytes = ROWS * 128;
    // Byte offset of element (r, c).
    static __device__ __forceinline__ uint32_t offset(int r, int c) {
        const int chunk = (c & 63) >> 3;
        return static_cast<uint32_t>((c >> 6) * kBlockBytes + r * 128 + ((chunk ^ (r & 7)) << 4) +
                                     (c & 7) * 2);
    }
};

} // namespace sm90
} // namespace lf
