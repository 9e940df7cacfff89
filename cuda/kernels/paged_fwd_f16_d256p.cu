// Many queries per sequence over a KV cache (chunked prefill), f16, head dims below 256
// (multiples of 8) in 256-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_f16_d256p, __half, 256, true)
