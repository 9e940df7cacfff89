// Forward attention on Hopper (sm_90a only), f16, head dims 68 to 124 in 128-wide tiles: dense, causal and sliding-window masks.
#include "../fwd_sm90.cuh"
LF_DEFINE_FWD_PADDED_SM90_KERNEL(lf_fwd_sm90_f16_d128p, __half, 128)
