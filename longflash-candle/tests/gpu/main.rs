//! GPU tests: every entry point against attention written with candle's own ops (matmul,
//! softmax, explicit rotations) in f32, on random inputs. Inputs are drawn and references
//! computed on the CPU, so that the GPU side runs only longflash's kernels and candle's own
//! casts and copies (no cuBLAS or cuRAND call: the binary runs where only the driver is). Without
//! a GPU each test prints that it skipped; with LONGFLASH_REQUIRE_GPU=1 a missing GPU (or a
//! build without the `cuda` feature) fails.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_need_the_cuda_feature() {
    let required = std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LONGFLASH_REQUIRE_GPU=1 but longflash-candle was built without its `cuda` feature"
    );
    println!("skipped: the GPU tests need the `cuda` feature");
}

/// CUDA device 0 or a printed skip (see common::device), returning from the test when skipped.
#[cfg(feature = "cuda")]
macro_rules! gpu_or_skip {
    ($name:expr) => {
        match device($name) {
            Some(d) => d,
            None => return Ok(()),
        }
    };
}

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod common;
#[cfg(feature = "cuda")]
mod kvcache;
#[cfg(feature = "cuda")]
mod rope;
