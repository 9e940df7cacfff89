// Variable-length (packed) forward attention, f16, head dims below 256 (multiples of 8) in
// 256-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d256p, __half, 256, true)
