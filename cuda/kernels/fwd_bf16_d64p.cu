// Exact forward attention, bf16, head dims below 64 (multiples of 8) in 64-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d64p, __nv_bfloat16, 64, true)
