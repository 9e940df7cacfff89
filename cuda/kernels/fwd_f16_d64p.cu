// Exact forward attention, f16, head dims below 64 (multiples of 8) in 64-wide tiles.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d64p, __half, 64, true)
