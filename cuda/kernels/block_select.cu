// Dynamic block selection: each query block's top-k key blocks by their means' scores, as CSR rows.
#include "../select.cuh"
LF_DEFINE_BLOCK_SELECT_KERNEL(lf_block_select)
