// Many queries per sequence over a KV cache (chunked prefill), bf16, head dims below 256
// (multiples of 8) in 256-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_bf16_d256p, __nv_bfloat16, 256, true)
