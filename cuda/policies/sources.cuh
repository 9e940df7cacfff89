// Key sources and Q preparation: where a visited item's key rows come from, and what happens to
// the Q tile once it is in shared memory.
#pragma once

#include <stdint.h>

namespace lf {

// The key rows of tile kt for item variant v: here one tensor, K itself.
struct PlainKeys {
    const uint16_t *base;
    int64_t row_stride;
    __device__ __forceinline__ const uint16_t *tile(int, int kt, int bc) const {
        return base + static_cast<int64_t>(kt) * bc * row_stride;
    }
    __device__ __forceinline__ int64_t stride(int) const { return row_stride; }
};

// Q as loaded (no rotation).
struct NoQPrep {
    static constexpr bool kActive = false;
    __device__ __forceinline__ void operator()(uint32_t, int, int, int) const {}
};

} // namespace lf
