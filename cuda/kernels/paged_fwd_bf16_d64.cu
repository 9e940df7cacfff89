// Many queries per sequence over a KV cache (chunked prefill), bf16, head dimension 64.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_bf16_d64, __nv_bfloat16, 64, false)
