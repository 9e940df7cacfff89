// Variable-length (packed) forward attention, f16, head dims below 64 (multiples of 8) in
// 64-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d64p, __half, 64, true)
