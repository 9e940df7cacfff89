// The Hopper forward with a per-key mask (a masked memory's pass), f16, head dim 128 (sm_90a only).
#include "../fwd_sm90.cuh"
LF_DEFINE_KEYMASK_SM90_KERNEL(lf_keymask_sm90_f16_d128, __half, 128)
