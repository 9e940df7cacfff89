//! Loads the embedded fatbins into a CUDA context, once per (context, kernel), and unloads them
//! when the owner is dropped.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The GPU targets the embedded kernels were compiled for (e.g. `"80,90a"`).
pub const COMPILED_ARCHS: &str = embedded::ARCHS;

#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub(crate) func: sys::CUfunction,
}

struct Loaded {
    // Each module once, by name (a second kernel of a module reuses it).
    modules: Vec<(String, sys::CUmodule)>,
    kernels: HashMap<String, Kernel>,
}

/// Per-context module cache.
pub(crate) struct ModuleCache {
    ctx: sys::CUcontext,
    loaded: Mutex<Loaded>,
}

// SAFETY: CUmodule, CUfunction and CUcontext are driver handles that may be used from any thread;
// the cache's mutable state is behind a Mutex.
unsafe impl Send for ModuleCache {}
// SAFETY: as above; all access to `loaded` takes the lock.
unsafe impl Sync for ModuleCache {}

/// Makes `ctx` current on this thread for the guard's lifetime, restoring the previous one.
pub(crate) struct CtxGuard {
    pushed: bool,
}

impl CtxGuard {
    /// # Safety
    /// `ctx` must be a live context.
    pub(crate) unsafe fn bind(ctx: sys::CUcontext) -> Result<Self> {
        let mut cur: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the driver is loaded (callers hold a context).
        unsafe { sys::cuCtxGetCurrent(&mut cur) }
            .result()
            .map_err(Error::driver("reading the current context"))?;
        if cur == ctx {
            return Ok(CtxGuard { pushed: false });
        }
        // SAFETY: the caller guarantees `ctx` is live.
        unsafe { sys::cuCtxPushCurrent_v2(ctx) }
            .result()
            .map_err(Error::driver("making the context current"))?;
        Ok(CtxGuard { pushed: true })
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        if self.pushed {
            let mut prev: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: pops the context this guard pushed on this thread.
            let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut prev) };
        }
    }
}

impl ModuleCache {
    pub(crate) fn new(ctx: sys::CUcontext) -> Self {
        ModuleCache {
            ctx,
            loaded: Mutex::new(Loaded {
                modules: Vec::new(),
                kernels: HashMap::new(),
            }),
        }
    }

    /// Whether a fatbin `module` can be loaded: compiled into this build (`build.rs` skips the
    /// Hopper-only kernels when sm_90a is not a target) or present in `LONGFLASH_KERNEL_DIR`.
    pub(crate) fn has_module(module: &str) -> bool {
        embedded::FATBINS.iter().any(|(stem, _)| *stem == module)
            || std::env::var_os("LONGFLASH_KERNEL_DIR").is_some_and(|dir| {
                std::path::Path::new(&dir)
                    .join(format!("{module}.fatbin"))
                    .is_file()
            })
    }

    /// The kernel `name` from the fatbin `module`, loading the module on first use and raising
    /// the kernel's dynamic shared-memory limit to `smem_bytes`.
    ///
    /// # Safety
    /// The cache's context must be live.
    pub(crate) unsafe fn kernel(
        &self,
        module: &str,
        name: &str,
        smem_bytes: u32,
    ) -> Result<Kernel> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = loaded.kernels.get(name) {
            return Ok(*k);
        }
        // SAFETY: the caller guarantees the context is live.
        let _guard = unsafe { CtxGuard::bind(self.ctx) }?;
        let loaded_module = loaded
            .modules
            .iter()
            .find(|(m, _)| m == module)
            .map(|(_, cu)| *cu);
        let cu_module = match loaded_module {
            Some(cu) => cu,
            None => {
                // LONGFLASH_KERNEL_DIR (a development aid for A/B timing of kernel variants
                // without a Rust toolchain) loads `<dir>/<module>.fatbin` instead of the
                // embedded image.
                let replaced = std::env::var_os("LONGFLASH_KERNEL_DIR").and_then(|dir| {
                    std::fs::read(std::path::Path::new(&dir).join(format!("{module}.fatbin"))).ok()
                });
                let image: &[u8] = match &replaced {
                    Some(bytes) => bytes,
                    None => embedded::FATBINS
                        .iter()
                        .find(|(stem, _)| *stem == module)
                        .map(|(_, bytes)| *bytes)
                        .ok_or_else(|| Error::InvalidArgument {
                            arg: "kernel",
                            value: module.to_string(),
                            expected: "a kernel compiled into this build".into(),
                        })?,
                };
                // The driver reads the image through a pointer and needs it 8-byte aligned;
                // include_bytes gives no alignment, so copy it into u64 storage.
                let mut aligned = vec![0u64; image.len().div_ceil(8)];
                // SAFETY: `aligned` holds at least image.len() bytes and does not overlap `image`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        image.as_ptr(),
                        aligned.as_mut_ptr().cast::<u8>(),
                        image.len(),
                    )
                };
                // SAFETY: `aligned` is a complete fatbin image, alive for the call; the context
                // is current.
                let cu_module =
                    unsafe { result::module::load_data(aligned.as_ptr().cast::<c_void>()) }
                        .map_err(Error::driver(
                            "loading the kernel module (is the GPU older than sm_80?)",
                        ))?;
                loaded.modules.push((module.to_string(), cu_module));
                cu_module
            }
        };
        let cname = CString::new(name).map_err(|_| Error::InvalidArgument {
            arg: "kernel",
            value: name.to_string(),
            expected: "a kernel name without NUL bytes".into(),
        })?;
        // SAFETY: the module is loaded in the current context (now or by an earlier call).
        let func = unsafe { result::module::get_function(cu_module, cname) }
            .map_err(Error::driver("looking up the kernel"))?;
        // SAFETY: `func` is a live kernel handle; the attribute takes a byte count.
        unsafe {
            result::function::set_function_attribute(
                func,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
        }
        .map_err(Error::driver("raising the kernel's shared-memory limit"))?;
        let k = Kernel { func };
        loaded.kernels.insert(name.to_string(), k);
        Ok(k)
    }
}

impl Drop for ModuleCache {
    fn drop(&mut self) {
        let loaded = self.loaded.get_mut().unwrap_or_else(|e| e.into_inner());
        if loaded.modules.is_empty() {
            return;
        }
        // SAFETY: the owner keeps the context alive at least as long as this cache.
        if let Ok(_g) = unsafe { CtxGuard::bind(self.ctx) } {
            // Kernels launched from these modules may still be queued: let them finish first.
            // SAFETY: the context is current; the call only waits.
            let _ = unsafe { sys::cuCtxSynchronize() };
            for (_, m) in loaded.modules.drain(..) {
                // SAFETY: each module was loaded by this cache and is unloaded once.
                let _ = unsafe { result::module::unload(m) };
            }
        }
    }
}
