/* Host entry points over tile_plan.h, so the Rust CPU model runs the kernels' own plan arithmetic. */
#include "longflash/tile_plan.h"

int lf_host_visible(LfMask m, int64_t i, int64_t j) { return lf_visible(m, i, j); }
LfTileRange lf_host_key_tile_range(LfMask m, int32_t qt, int32_t br, int32_t bc) {
    return lf_key_tile_range(m, qt, br, bc);
}
int lf_host_tile_is_full(LfMask m, int32_t qt, int32_t t, int32_t br, int32_t bc) {
    return lf_tile_is_full(m, qt, t, br, bc);
}
void lf_host_row_key_bounds(LfMask m, int64_t i, int64_t *lo, int64_t *hi, int64_t *sink_hi) {
    lf_row_key_bounds(m, i, lo, hi, sink_hi);
}
LfTileRange lf_host_query_tile_range(LfMask m, int32_t kt, int32_t br, int32_t bc) {
    return lf_query_tile_range(m, kt, br, bc);
}
