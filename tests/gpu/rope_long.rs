//! RoPE / ReRoPE / Leaky ReRoPE at the positions an engine reaches: one prefill chunk over tens
//! of thousands of cached keys (bottom-right, a last query tile that is not full), with
//! SmolLM2's rotation (base 100000, interleaved pairs, head dim 64, f16), against the two-matrix
//! reference. The other RoPE tests stay under a thousand positions.

use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::DType;

use crate::rope::{rope_case, run_rope};

/// SmolLM2-135M's rotation: base 100000 over all 64 elements, pairs (2f, 2f + 1) (the GGUF
/// layout).
pub(crate) fn smollm2_rope(mode: PositionMode) -> RopeOptions {
    RopeOptions::new(
        RopeConfig {
            base: 100000.0,
            rotary_dim: 64,
            layout: RopeLayout::Interleaved,
            scaling: RopeScaling::None,
        },
        mode,
    )
}

/// The position modes of the SmolLM2 runs: ReRoPE 4096, Leaky ReRoPE 2048 / 16, plain RoPE.
pub(crate) const SMOLLM2_MODES: [PositionMode; 3] = [
    PositionMode::ReRope { window: 4096 },
    PositionMode::LeakyReRope {
        window: 2048,
        leak: 16.0,
    },
    PositionMode::Rope,
];

#[test]
fn rope_long_context_chunks_match_the_reference() {
    let g = gpu_or_skip!();
    // (queries, keys, query heads): the last chunk of a 32752-token prompt in chunks of 2048, a
    // whole chunk at 32k, and a short chunk far out. One KV head (three query heads over it,
    // as a SmolLM2 group) keeps the f64 reference short.
    for (sq, sk, hq) in [(2032, 32752, 3), (2048, 32768, 1), (240, 40000, 3)] {
        for mode in SMOLLM2_MODES {
            if sq > 1000 && mode != SMOLLM2_MODES[0] {
                continue; // the reference's cost; the short chunk covers the other modes
            }
            let mut c = rope_case(64, (sq, sk), mode);
            c.dtype = DType::F16;
            c.batch = 1;
            c.heads_q = hq;
            c.heads_kv = 1;
            c.rope = smollm2_rope(mode);
            let r = run_rope(g, &c);
            assert!(
                r.cmp.passes,
                "{sq} queries over {sk} keys, {mode:?}\n  {}",
                r.cmp
            );
        }
    }
}
