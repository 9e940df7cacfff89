// Many queries per sequence over a KV cache (chunked prefill), f16, head dimension 256.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_f16_d256, __half, 256, false)
