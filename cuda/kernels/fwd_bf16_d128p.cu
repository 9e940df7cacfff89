// Exact forward attention, bf16, head dims below 128 (multiples of 8) in 128-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d128p, __nv_bfloat16, 128, true)
