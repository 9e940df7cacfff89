// Many queries per sequence over a KV cache (chunked prefill), f16, head dimension 64.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_f16_d64, __half, 64, false)
