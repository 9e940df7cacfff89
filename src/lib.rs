#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod attention;
mod check;
pub mod dtype;
pub mod error;
pub mod layout;
mod loader;
pub mod mask;
pub mod plan;
pub mod reference;
pub mod ring;
pub mod rope;
#[rustfmt::skip]
pub mod sys;
pub mod sparse;

pub use attention::{
    backward_workspace_bytes, open_device, rope_backward_workspace_bytes, Attention,
    BackwardInputs, BackwardOptions, BlockSelectPlan, BlockSelector, BlockTable, DecodeOptions,
    DecodePlan, DecodeProblem, DeviceErrorFlag, ForwardOptions, Gradient, Gradients, Input,
    KvCache, KvCacheMut, Mainloop, MainloopChoice, MemoryBuffer, MemoryDecode, MemoryDecodePlan,
    MemoryForward, MemoryInput, Output, RawAppend, RawBackward, RawBlockMask, RawBlockSelect,
    RawDecode, RawForward, RawMemory, RawMemoryDecode, RawMemorySelect, RawMerge, RawRope,
    RawRopeMode, RawVarlenForward, RingAccumulator, RopeBackward, RopeForward, SelectedBlocks,
    SelectedOptions, SparseBackwardOptions, SparseOptions, SplitCounters, VarlenOptions,
    SUPPORTED_HEAD_DIMS,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::Layout;
pub use loader::COMPILED_ARCHS;
pub use mask::MaskSpec;
pub use sparse::{BlockMask, DeviceBlockMask, DeviceKeyMajorMask, KeyMajorMask, MaskShape};
