// Many queries per sequence over a KV cache (chunked prefill), bf16, head dims below 128
// (multiples of 8) in 128-wide tiles.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_bf16_d128p, __nv_bfloat16, 128, true)
