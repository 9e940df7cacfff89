// Many queries per sequence over a KV cache (chunked prefill), bf16, head dims below 64
// (multiples of 8) in 64-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_bf16_d64p, __nv_bfloat16, 64, true)
