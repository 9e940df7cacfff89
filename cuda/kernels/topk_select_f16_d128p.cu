// Top-k memory selection, f16, head dims below 128 that are multiples of 4 (e.g. 100), zero-padded to the 128-wide tile.
#include "../topk.cuh"
LF_DEFINE_TOPK_SELECT_KERNEL(lf_topk_select_f16_d128p, __half, 128, true)
