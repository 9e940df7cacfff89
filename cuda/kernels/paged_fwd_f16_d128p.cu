// Many queries per sequence over a KV cache (chunked prefill), f16, head dims below 128
// (multiples of 8) in 128-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_f16_d128p, __half, 128, true)
