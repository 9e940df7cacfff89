// Element masks: which (row, key) elements of a partial tile are visible. A mask answers per
// row with a key interval relative to the tile's first key, so a mainloop applies it with one
// comparison pair per element whatever its accumulator layout.
#pragma once

#include "longflash/params.h"
#include "longflash/tile_plan.h"

namespace lf {

// 32 bits whatever the sequence lengths.
struct WindowMask {
    // Whether a per-key mask applies to every tile besides the interval (KeyBytesMask).
    static constexpr bool kKeyBytes = false;
    LfMask m;
    struct RowKeys {
        int lo, hi, sink;
        __device__ __forceinline__ bool visible(int j) const {
            return j < sink || (j >= lo && j < hi);
        }
    };
    template <class Iter>
    __device__ __forceinline__ RowKeys row_keys(const Iter &, int, int64_t i, int k0, int span) const {
        int64_t l, h, sh;
        lf_row_key_bounds(m, i, &l, &h, &sh);
        auto rel = [&](int64_t x) { return static_cast<int>(lf_min64(lf_max64(x - k0, 0), span)); };
        return RowKeys{rel(l), rel(h), rel(sh)};
    }
};

// The window mask plus one byte per key (key j visible only where bytes[j] != 0, read for keys
// below m.seqlen_k): a masked memory's pass on the Hopper mainloop. A consumer warp loads a key
// tile's bytes a tile ahead of their use (load: BC / 32 bytes per lane, lane l holding keys
// l * BC / 32 onwards, each in its own register, so that nothing waits for the loads until the
// next tile) and applies them to that tile's S (hide: the warp's bytes as BC / 32 ballots, so
// each thread finds its columns' bits without another load; a tile whose keys are all visible
// costs the ballots only).
struct KeyBytesMask : WindowMask {
    static constexpr bool kKeyBytes = true;
    const uint8_t *bytes; // the batch entry's first key

    // A lane's bytes of one key tile (0 past the keys).
    template <int BC> struct Bytes {
        uint32_t b[BC / 32];
    };

    template <int BC>
    __device__ __forceinline__ Bytes<BC> load(int k0, int lane) const {
        constexpr int E = BC / 32;
        Bytes<BC> w;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const int j = k0 + lane * E + i;
            w.b[i] = j < m.seqlen_k ? static_cast<uint32_t>(__ldg(bytes + j)) : 0u;
        }
        return w;
    }

    // Sets the scores of hidden keys to -inf: s holds the thread's accumulators of an m16 tile
    // (columns 8 j + 2 tq + c of rows g and g + 8 in s[j][c] and s[j][2 + c]); w is what load
    // gave this lane for the tile.
    template <int BC>
    __device__ __forceinline__ void hide(float (&s)[BC / 8][4], const Bytes<BC> &w, int tq) const {
        constexpr int E = BC / 32;
        static_assert(E == 2 || E == 4, "key tiles of 64 or 128 keys");
        // Key c of the tile is bit c / E of ballot c % E.
        uint32_t b[E];
        uint32_t all = 0xffffffffu;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            b[i] = __ballot_sync(0xffffffffu, w.b[i] != 0);
            all &= b[i];
        }
        if (all == 0xffffffffu) return;
        // Column 8 j + 2 tq + c: ballot (2 tq + c) % E, bit (8 j + 2 tq + c) / E, i.e. for
        // E = 4 ballot 2 (tq & 1) + c, bit 2 j + tq / 2; for E = 2 ballot c, bit 4 j + tq.
        uint32_t wc[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            if constexpr (E == 4)
                wc[c] = ((tq & 1) ? b[2 + c] : b[c]) >> (tq >> 1);
            else
                wc[c] = b[c] >> tq;
        }
        constexpr int kStep = 8 / E;
#pragma unroll
        for (int j = 0; j < BC / 8; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (!((wc[c] >> (kStep * j)) & 1u)) {
                    s[j][c] = -INFINITY;
                    s[j][2 + c] = -INFINITY;
                }
    }
};

} // namespace lf
