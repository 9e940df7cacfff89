// The Hopper forward with a per-key mask (a masked memory's pass), f16, head dims 68 to 124 in 128-wide tiles (sm_90a only).
#include "../fwd_sm90.cuh"
LF_DEFINE_KEYMASK_PADDED_SM90_KERNEL(lf_keymask_sm90_f16_d128p, __half, 128)
