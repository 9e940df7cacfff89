// Element masks: which (row, key) elements of a partial tile are visible. A mask answers per
// row with a key interval relative to the tile's first key, so a mainloop applies it with one
// comparison pair per element whatever its accumulator layout.
#pragma once

#include "longflash/params.h"
#include "longflash/tile_plan.h"

namespace lf {

// 32 bits whatever the sequence lengths.
struct WindowMask {
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

} // namespace lf
