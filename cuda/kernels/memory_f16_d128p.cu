// Memory attention, f16, head dims below 128 that are multiples of 4 (e.g. 100), zero-padded
// to the 128-wide tile inside the kernel.
#include "../memory.cuh"
LF_DEFINE_MEMORY_KERNEL(lf_memory_f16_d128p, __half, 128, true)
