//! Typed errors. Every error that comes from bad input names the argument, the value it had and
//! what was expected; none of them is reached by panicking.

use std::fmt;

/// Everything a longflash call can fail with.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An argument's value is outside what the call accepts.
    InvalidArgument {
        /// The argument, e.g. `"k.head_dim"`.
        arg: &'static str,
        /// The value it had, printed.
        value: String,
        /// What was expected, in words.
        expected: String,
    },
    /// A dimension is zero; every dimension must be at least 1.
    ZeroSized {
        /// The argument, e.g. `"q"`.
        arg: &'static str,
        /// The dimension, e.g. `"seqlen"`.
        dim: &'static str,
    },
    /// Two arguments that must agree do not.
    ShapeMismatch {
        /// The argument that disagrees, e.g. `"v.seqlen"`.
        arg: &'static str,
        /// Its value.
        value: usize,
        /// The argument it must agree with, e.g. `"k.seqlen"`.
        other: &'static str,
        /// That argument's value.
        expected: usize,
    },
    /// The head dimension has no kernel.
    UnsupportedHeadDim {
        /// The argument, e.g. `"q.head_dim"`.
        arg: &'static str,
        /// The head dimension asked for.
        value: usize,
        /// The head dimensions that have a kernel.
        supported: &'static [usize],
    },
    /// The query heads are not a multiple of the key/value heads (GQA/MQA needs them to be).
    HeadsNotDivisible {
        /// Query heads.
        heads_q: usize,
        /// Key/value heads.
        heads_kv: usize,
    },
    /// The strides of a tensor would reach past the end of its buffer (or before its start).
    OutOfBounds {
        /// The argument.
        arg: &'static str,
        /// Elements the layout reaches: one past the largest element offset it addresses.
        required: u128,
        /// Elements in the buffer.
        len: usize,
    },
    /// A pointer or stride does not meet the kernel's 16-byte access rule.
    Misaligned {
        /// The argument, e.g. `"q.seq_stride"`.
        arg: &'static str,
        /// The value.
        value: i64,
        /// What it must be a multiple of (in elements for strides, bytes for pointers).
        multiple_of: u32,
    },
    /// An output tensor would write some element twice (its strides overlap).
    OverlappingOutput {
        /// The output argument.
        arg: &'static str,
    },
    /// An output overlaps an input or another output in memory.
    Aliasing {
        /// The output argument.
        output: &'static str,
        /// The argument it overlaps.
        other: &'static str,
    },
    /// The attention window (or causal flag) is not a mask the kernels define.
    InvalidMask {
        /// The argument, e.g. `"mask.window_right"`.
        arg: &'static str,
        /// Its value, printed.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// No CUDA driver library (libcuda) could be loaded on this machine.
    NoDriver,
    /// The driver loaded but reports no CUDA device.
    NoDevice,
    /// The device's compute capability has no kernel image (sm_80 or newer is needed).
    UnsupportedDevice {
        /// Major, minor compute capability.
        compute_capability: (i32, i32),
    },
    /// A kernel found a device-side index out of its range (a cache length, a block-table entry,
    /// a sequence offset), clamped it so as to read and write nothing outside its buffers, and
    /// set the call's error flag: the output of that sequence is unspecified. Reported by
    /// [`DeviceErrorFlag::check`](crate::DeviceErrorFlag::check).
    DeviceIndexOutOfRange {
        /// What the caller was checking, as it named it.
        during: &'static str,
    },
    /// A call into the CUDA driver failed.
    Driver {
        /// What was being done.
        during: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument {
                arg,
                value,
                expected,
            } => write!(f, "invalid `{arg}` = {value}: expected {expected}"),
            Error::ZeroSized { arg, dim } => {
                write!(f, "`{arg}.{dim}` = 0: every dimension must be at least 1")
            }
            Error::ShapeMismatch {
                arg,
                value,
                other,
                expected,
            } => write!(
                f,
                "`{arg}` = {value} does not match `{other}` = {expected}: they must be equal"
            ),
            Error::UnsupportedHeadDim {
                arg,
                value,
                supported,
            } => write!(
                f,
                "`{arg}` = {value} is not supported: expected one of {supported:?}"
            ),
            Error::HeadsNotDivisible { heads_q, heads_kv } => write!(
                f,
                "`q.heads` = {heads_q} is not a multiple of `k.heads` = {heads_kv}: \
                 grouped-query attention needs query heads = a whole multiple of key/value heads"
            ),
            Error::OutOfBounds { arg, required, len } => write!(
                f,
                "`{arg}`: its shape and strides reach {required} elements but the buffer holds {len}"
            ),
            Error::Misaligned {
                arg,
                value,
                multiple_of,
            } => write!(
                f,
                "`{arg}` = {value} is misaligned: expected a multiple of {multiple_of}"
            ),
            Error::OverlappingOutput { arg } => write!(
                f,
                "`{arg}`: its strides make distinct elements share memory; an output must not overlap itself"
            ),
            Error::Aliasing { output, other } => write!(
                f,
                "output `{output}` overlaps `{other}` in memory: outputs must not alias inputs or other outputs"
            ),
            Error::InvalidMask {
                arg,
                value,
                expected,
            } => write!(f, "invalid `{arg}` = {value}: expected {expected}"),
            Error::NoDriver => write!(
                f,
                "no CUDA driver: libcuda could not be loaded (install the NVIDIA driver, or run on a machine with a GPU)"
            ),
            Error::NoDevice => write!(f, "the CUDA driver reports no device"),
            Error::UnsupportedDevice { compute_capability } => write!(
                f,
                "device of compute capability {}.{} is not supported: expected 8.0 or newer",
                compute_capability.0, compute_capability.1
            ),
            Error::DeviceIndexOutOfRange { during } => write!(
                f,
                "{during}: a kernel found a device-side index (cache length, block-table entry or \
                 sequence offset) outside its range; it was clamped, and the output of that \
                 sequence is unspecified"
            ),
            Error::Driver { during, source } => {
                write!(f, "CUDA driver error while {during}: {source:?}")
            }
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub(crate) fn driver(
        during: &'static str,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Driver { during, source }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
