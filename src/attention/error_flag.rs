//! The device-side error flag of the serving calls as a typed error.
//!
//! Cache lengths, block tables and sequence offsets live on the device in an engine, so the
//! calls that read them (`decode`, `decode_rope`, `append_kv`, `append_kv_rope`, the varlen
//! forwards) cannot check them before the launch without a copy and a synchronization. Their
//! kernels clamp an index that is out of range, so they never read or write outside a buffer,
//! and OR 1 into an optional i32 flag. [`DeviceErrorFlag`] owns such a flag and turns it into
//! [`Error::DeviceIndexOutOfRange`] when asked.
//!
//! Cost: nothing on the launches (the kernels set the flag only when they clamp); a
//! [`check`](DeviceErrorFlag::check) copies 4 bytes to the host, so it waits for everything
//! queued on its stream. Keep it off the hot path: the flag accumulates over calls until
//! checked, so one check per step, per batch of steps, or in debug builds only, covers every
//! call that used it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};

use crate::error::{Error, Result};

/// An i32 on the device that the serving kernels set when they clamp a device-side index (see
/// the [module](self) docs).
///
/// ```no_run
/// # use longflash::{Attention, DeviceErrorFlag};
/// # fn demo(ctx: &std::sync::Arc<cudarc::driver::CudaContext>) -> longflash::Result<()> {
/// let stream = ctx.default_stream();
/// let mut flag = DeviceErrorFlag::new(&stream)?;
/// // ... attn.decode(&stream, q, &cache, out, Some(&mut flag.view_mut()), &options)?; ...
/// flag.check(&stream, "decoding step")?; // Err(Error::DeviceIndexOutOfRange) if clamped
/// # Ok(()) }
/// ```
pub struct DeviceErrorFlag {
    flag: CudaSlice<i32>,
}

impl DeviceErrorFlag {
    /// A cleared flag on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let flag = stream
            .alloc_zeros(1)
            .map_err(Error::driver("allocating the error flag"))?;
        Ok(DeviceErrorFlag { flag })
    }

    /// The flag as the calls take it (`error_flag: Some(&mut flag.view_mut())`).
    pub fn view_mut(&mut self) -> CudaViewMut<'_, i32> {
        self.flag.as_view_mut()
    }

    /// Reads the flag after the work queued on `stream` so far (a synchronization), clears it,
    /// and returns [`Error::DeviceIndexOutOfRange`] (naming `during`) when a kernel had set it.
    pub fn check(&mut self, stream: &Arc<CudaStream>, during: &'static str) -> Result<()> {
        let v = stream
            .clone_dtoh(&self.flag)
            .map_err(Error::driver("reading the error flag"))?;
        if v.first().copied().unwrap_or(0) == 0 {
            return Ok(());
        }
        stream
            .memset_zeros(&mut self.flag)
            .map_err(Error::driver("clearing the error flag"))?;
        Err(Error::DeviceIndexOutOfRange { during })
    }
}
