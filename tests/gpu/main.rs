//! GPU tests: the forward kernels against the CPU reference under the correctness rule of
//! `longflash::reference::compare`, over dtypes, head dims, batch, heads, GQA ratios, sequence
//! lengths, masks and strides. One binary, one module per kernel family. Without a GPU each test
//! prints that it skipped; with LONGFLASH_REQUIRE_GPU=1 a missing GPU fails.

/// The shared device, or a printed skip (a failure under LONGFLASH_REQUIRE_GPU=1) and `return`.
macro_rules! gpu_or_skip {
    () => {
        match crate::common::gpu() {
            Some(g) => g,
            None => {
                crate::common::say_skipped(std::thread::current().name().unwrap_or("gpu test"));
                return;
            }
        }
    };
}

mod append;
mod backward;
mod common;
mod corner;
mod decode;
mod decode_rope;
mod decode_splits;
mod dense;
mod hopper;
mod memory;
mod memory_buffer;
mod memory_decode;
mod memory_top_k;
mod narrow;
mod ring;
mod rope;
mod rope_long;
mod select;
mod sparse;
mod varlen;
mod varlen_rope;
