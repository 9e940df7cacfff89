// Many queries per sequence over a KV cache (chunked prefill), bf16, head dimension 128.
#include "../paged.cuh"
LF_DEFINE_PAGED_KERNEL(lf_paged_fwd_bf16_d128, __nv_bfloat16, 128, false)
