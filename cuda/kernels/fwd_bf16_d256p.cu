// Exact forward attention, bf16, head dims below 256 (multiples of 8) in 256-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d256p, __nv_bfloat16, 256, true)
