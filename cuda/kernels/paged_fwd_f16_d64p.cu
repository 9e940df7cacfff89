// Many queries per sequence over a KV cache (chunked prefill), f16, head dims below 64
// (multiples of 8) in 64-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_f16_d64p, __half, 64, true)
