// The Hopper forward with a per-key mask (a masked memory's pass), bf16, head dim 64 (sm_90a only).
#include "../fwd_sm90.cuh"
LF_DEFINE_KEYMASK_SM90_KERNEL(lf_keymask_sm90_bf16_d64, __nv_bfloat16, 64)
