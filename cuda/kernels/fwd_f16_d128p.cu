// Exact forward attention, f16, head dims below 128 (multiples of 8) in 128-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d128p, __half, 128, true)
