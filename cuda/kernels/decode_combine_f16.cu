// The split merge of the decoding kernel, f16.
#include "../decode.cuh"
LF_DEFINE_DECODE_COMBINE_KERNEL(lf_decode_combine_f16, __half)
