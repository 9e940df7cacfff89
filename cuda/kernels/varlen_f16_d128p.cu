// Variable-length (packed) forward attention, f16, head dims below 128 (multiples of 8) in
// 128-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d128p, __half, 128, true)
