// Exact forward attention, f16, head dims below 256 (multiples of 8) in 256-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d256p, __half, 256, true)
