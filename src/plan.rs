//! The kernels' tile plan, on the CPU.
//!
//! A forward kernel splits the queries into tiles of `br` rows and, for each query tile, walks a
//! contiguous range of key tiles of `bc` keys. Some of the visited tiles are *full* (every query
//! of the tile sees every key of it, so no element mask is applied) and the others *partial*
//! (masked per element: causal diagonal, window edge, end of the key sequence). The arithmetic
//! that decides this lives in `cuda/include/longflash/tile_plan.h` and is compiled both into the
//! kernels and, through `cuda/host/plan.c`, into this library: [`Plan`] calls that very C code,
//! so tests of the plan here test what the kernels run.

use std::os::raw::c_int;

use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::sys::{self, LfMask, LfTileRange};

extern "C" {
    fn lf_host_visible(m: LfMask, i: i64, j: i64) -> c_int;
    fn lf_host_key_tile_range(m: LfMask, qt: i32, br: i32, bc: i32) -> LfTileRange;
    fn lf_host_tile_is_full(m: LfMask, qt: i32, t: i32, br: i32, bc: i32) -> c_int;
    fn lf_host_row_key_bounds(m: LfMask, i: i64, lo: *mut i64, hi: *mut i64, sink_hi: *mut i64);
    fn lf_host_query_tile_range(m: LfMask, kt: i32, br: i32, bc: i32) -> LfTileRange;
}

/// The keys one query row sees, as two ranges (see [`Plan::row_keys`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKeys {
    /// Attention-sink keys, `0..n` (empty when there are none).
    pub sinks: std::ops::Range<i64>,
    /// The window, `lo..hi`.
    pub window: std::ops::Range<i64>,
}

impl RowKeys {
    /// Whether key `j` is in either range.
    pub fn contains(&self, j: i64) -> bool {
        self.sinks.contains(&j) || self.window.contains(&j)
    }
}

/// Tile shape of a kernel: `br` query rows by `bc` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileShape {
    /// Query rows per tile.
    pub br: usize,
    /// Keys per tile.
    pub bc: usize,
}

/// The forward kernel's tile shape for a head dimension (64, 128 or 256), `None` for a head
/// dimension that has no forward kernel.
pub fn forward_tile_shape(head_dim: usize) -> Option<TileShape> {
    let (br, bc) = match head_dim {
        64 => (sys::LF_FWD_BR_D64, sys::LF_FWD_BC_D64),
        128 => (sys::LF_FWD_BR_D128, sys::LF_FWD_BC_D128),
        256 => (sys::LF_FWD_BR_D256, sys::LF_FWD_BC_D256),
        _ => return None,
    };
    Some(TileShape {
        br: br as usize,
        bc: bc as usize,
    })
}

/// The backward kernel's tile shape for a head dimension (64, 128 or 256): `bc` keys per CTA
/// (held in shared memory, their dK and dV in registers) and `br` query rows per step of its loop
/// over the query tiles that see them; `None` for a head dimension without a backward kernel.
pub fn backward_tile_shape(head_dim: usize) -> Option<TileShape> {
    let (br, bc) = match head_dim {
        64 => (sys::LF_BWD_BR_D64, sys::LF_BWD_BC_D64),
        128 => (sys::LF_BWD_BR_D128, sys::LF_BWD_BC_D128),
        256 => (sys::LF_BWD_BR_D256, sys::LF_BWD_BC_D256),
        _ => return None,
    };
    Some(TileShape {
        br: br as usize,
        bc: bc as usize,
    })
}

/// The tile shape of the dense backward's second main kernel at head dims 64 and 256 (its module
/// `bwd_<dtype>_d<D>_tall`), for devices whose blocks may have its shared memory (sm_80 and sm_90
/// at 64, sm_90 at 256): taller query steps (`br` 128 and 64 rows) over the same `bc` keys, so
/// that each warp reuses the operands it loads from shared memory for more products; `None` at
/// other head dims.
pub fn backward_tall_tile_shape(head_dim: usize) -> Option<TileShape> {
    let (br, bc) = match head_dim {
        64 => (sys::LF_BWD_TALL_BR_D64, sys::LF_BWD_BC_D64),
        256 => (sys::LF_BWD_TALL_BR_D256, sys::LF_BWD_BC_D256),
        _ => return None,
    };
    Some(TileShape {
        br: br as usize,
        bc: bc as usize,
    })
}

/// The tile shape of the deterministic backward's dQ pass for a head dimension (64, 128 or 256):
/// `br` query rows per CTA, `bc` keys per step of its loop over the forward's plan.
pub fn backward_dq_tile_shape(head_dim: usize) -> Option<TileShape> {
    let bc = match head_dim {
        64 => sys::LF_BWD_DQ_BC_D64,
        128 => sys::LF_BWD_DQ_BC_D128,
        256 => sys::LF_BWD_DQ_BC_D256,
        _ => return None,
    };
    Some(TileShape {
        br: sys::LF_BWD_DQ_BR as usize,
        bc: bc as usize,
    })
}

/// Whether a visited tile needs the element mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileKind {
    /// Every (query, key) pair of the tile is visible; no element mask.
    Full,
    /// Some pair of the tile is masked (or lies past the end of the keys).
    Partial,
}

/// One key tile visited by a query tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlannedTile {
    /// Index of the key tile: keys `[key_tile * bc, min((key_tile + 1) * bc, seqlen_k))`.
    pub key_tile: usize,
    /// Full or partial.
    pub kind: TileKind,
}

/// The tile plan of one forward launch: which key tiles each query tile visits, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    mask: LfMask,
    seqlen_q: usize,
    seqlen_k: usize,
    shape: TileShape,
    /// `shape` as the C side takes it.
    br: i32,
    bc: i32,
}

impl Plan {
    /// The plan for `mask` over `seqlen_q` queries and `seqlen_k` keys with tiles of `shape`.
    ///
    /// # Errors
    ///
    /// Whatever [`MaskSpec::resolve`] rejects (zero or oversized sequence lengths, windows past
    /// `i32::MAX`, a causal mask with a right window), and [`Error::InvalidArgument`] for a tile
    /// side that is zero or past `i32::MAX`.
    pub fn new(
        mask: &MaskSpec,
        seqlen_q: usize,
        seqlen_k: usize,
        shape: TileShape,
    ) -> Result<Plan> {
        let mask = mask.resolve(seqlen_q, seqlen_k)?;
        let side = |arg: &'static str, x: usize| -> Result<i32> {
            i32::try_from(x)
                .ok()
                .filter(|&x| x > 0)
                .ok_or_else(|| Error::InvalidArgument {
                    arg,
                    value: x.to_string(),
                    expected: "a tile side in 1..=i32::MAX".into(),
                })
        };
        let br = side("shape.br", shape.br)?;
        let bc = side("shape.bc", shape.bc)?;
        Ok(Plan {
            mask,
            seqlen_q,
            seqlen_k,
            shape,
            br,
            bc,
        })
    }

    /// The resolved mask the kernels receive.
    pub fn mask(&self) -> LfMask {
        self.mask
    }

    /// Query tokens.
    pub fn seqlen_q(&self) -> usize {
        self.seqlen_q
    }

    /// Key tokens.
    pub fn seqlen_k(&self) -> usize {
        self.seqlen_k
    }

    /// The tile shape.
    pub fn shape(&self) -> TileShape {
        self.shape
    }

    /// Number of query tiles, `ceil(seqlen_q / br)`.
    pub fn num_query_tiles(&self) -> usize {
        self.seqlen_q.div_ceil(self.shape.br)
    }

    /// Number of key tiles, `ceil(seqlen_k / bc)`.
    pub fn num_key_tiles(&self) -> usize {
        self.seqlen_k.div_ceil(self.shape.bc)
    }

    /// Whether query `i` sees key `j`, by the kernels' own test (`lf_visible`). Points outside
    /// the sequences are not visible.
    pub fn visible(&self, i: usize, j: usize) -> bool {
        let (Ok(i), Ok(j)) = (i64::try_from(i), i64::try_from(j)) else {
            return false;
        };
        // SAFETY: `lf_host_visible` is a pure function of its by-value arguments (plain
        // integers and a `#[repr(C)]` struct that mirrors `LfMask`); it touches no memory.
        unsafe { lf_host_visible(self.mask, i, j) != 0 }
    }

    /// The keys query row `i` sees, as the kernels' element mask computes them
    /// (`lf_row_key_bounds`): the sink keys `0..sink_end` and the window `lo..hi` (either may be
    /// empty).
    pub fn row_keys(&self, i: usize) -> RowKeys {
        let i = i64::try_from(i).unwrap_or(i64::MAX);
        let (mut lo, mut hi, mut sink_hi) = (0i64, 0i64, 0i64);
        // SAFETY: a pure function of its by-value arguments that writes only the three locals.
        unsafe { lf_host_row_key_bounds(self.mask, i, &mut lo, &mut hi, &mut sink_hi) };
        RowKeys {
            sinks: 0..sink_hi,
            window: lo..hi,
        }
    }

    /// The key-tile range `[begin, end)` the kernel walks for `query_tile`, as the C plan
    /// computes it (empty when `begin >= end`; a query tile past the end gets an empty range).
    /// Unclipped, so tests can check that it stays inside `0..num_key_tiles()`.
    pub fn key_tile_range(&self, query_tile: usize) -> std::ops::Range<i64> {
        let Some(qt) = self.query_tile_index(query_tile) else {
            return 0..0;
        };
        // SAFETY: pure function of by-value integers and a `#[repr(C)]` mirror of `LfMask`;
        // it returns a `#[repr(C)]` mirror of `LfTileRange` by value and touches no memory.
        let r = unsafe { lf_host_key_tile_range(self.mask, qt, self.br, self.bc) };
        i64::from(r.begin)..i64::from(r.end)
    }

    /// The key tiles that `query_tile` visits, in order, each full or partial. Empty for a query
    /// tile past the end. Tiles of [`key_tile_range`](Self::key_tile_range) below zero (which
    /// the plan never produces) are left out.
    pub fn key_tiles(&self, query_tile: usize) -> Vec<PlannedTile> {
        let Some(qt) = self.query_tile_index(query_tile) else {
            return Vec::new();
        };
        self.key_tile_range(query_tile)
            .filter_map(|t| {
                let t32 = i32::try_from(t).ok()?;
                let key_tile = usize::try_from(t).ok()?;
                // SAFETY: pure function of by-value integers and a `#[repr(C)]` mirror of
                // `LfMask`; it touches no memory.
                let full = unsafe { lf_host_tile_is_full(self.mask, qt, t32, self.br, self.bc) };
                let kind = if full != 0 {
                    TileKind::Full
                } else {
                    TileKind::Partial
                };
                Some(PlannedTile { key_tile, kind })
            })
            .collect()
    }

    /// Whether key tile `key_tile` is full for query tile `query_tile` (every element visible,
    /// and the tile wholly inside the keys): the classification the kernels use, for any tile,
    /// including those a block mask lists. False for tiles past either end.
    pub fn tile_is_full(&self, query_tile: usize, key_tile: usize) -> bool {
        let (Some(qt), Ok(t)) = (self.query_tile_index(query_tile), i32::try_from(key_tile)) else {
            return false;
        };
        // SAFETY: pure function of by-value integers and a `#[repr(C)]` mirror of `LfMask`.
        unsafe { lf_host_tile_is_full(self.mask, qt, t, self.br, self.bc) != 0 }
    }

    /// The query-tile range `[begin, end)` the backward walks for `key_tile` (the transpose of
    /// [`key_tile_range`](Self::key_tile_range): every query tile that holds a row seeing a key
    /// of the tile), as the C plan computes it. Empty for a key tile past the end.
    pub fn query_tile_range(&self, key_tile: usize) -> std::ops::Range<i64> {
        if key_tile >= self.num_key_tiles() {
            return 0..0;
        }
        let Ok(kt) = i32::try_from(key_tile) else {
            return 0..0;
        };
        // SAFETY: pure function of by-value integers and a `#[repr(C)]` mirror of `LfMask`;
        // it returns a `#[repr(C)]` mirror of `LfTileRange` by value and touches no memory.
        let r = unsafe { lf_host_query_tile_range(self.mask, kt, self.br, self.bc) };
        if r.begin >= r.end {
            return 0..0;
        }
        i64::from(r.begin)..i64::from(r.end)
    }

    /// Total number of (query tile, key tile) pairs visited.
    pub fn visited_tiles(&self) -> usize {
        (0..self.num_query_tiles())
            .map(|qt| self.key_tiles(qt).len())
            .sum()
    }

    /// Number of (query, key) elements inside visited tiles, counting only rows below
    /// `seqlen_q` and keys below `seqlen_k`: the score and `P V` work a kernel does, for FLOP
    /// accounting (`4 * head_dim` FLOPs per pair for the forward pass).
    pub fn computed_pairs(&self) -> u64 {
        let (br, bc) = (self.shape.br as u64, self.shape.bc as u64);
        let (sq, sk) = (self.seqlen_q as u64, self.seqlen_k as u64);
        (0..self.num_query_tiles())
            .map(|qt| {
                let row0 = qt as u64 * br;
                let rows = (row0 + br).min(sq) - row0;
                let keys: u64 = self
                    .key_tiles(qt)
                    .iter()
                    .map(|t| {
                        let c0 = t.key_tile as u64 * bc;
                        (c0 + bc).min(sk).saturating_sub(c0)
                    })
                    .sum();
                rows * keys
            })
            .sum()
    }

    /// A picture of the plan: one line per query tile, one character per key tile, `#` for a
    /// full tile, `+` for a partial one, `.` for a skipped one.
    pub fn render(&self) -> String {
        let nk = self.num_key_tiles();
        let mut s = String::with_capacity(self.num_query_tiles() * (nk + 1));
        for qt in 0..self.num_query_tiles() {
            let mut line = vec!['.'; nk];
            for t in self.key_tiles(qt) {
                if let Some(c) = line.get_mut(t.key_tile) {
                    *c = match t.kind {
                        TileKind::Full => '#',
                        TileKind::Partial => '+',
                    };
                }
            }
            s.extend(line);
            s.push('\n');
        }
        s
    }

    /// `query_tile` as the C side takes it, `None` past the last query tile.
    fn query_tile_index(&self, query_tile: usize) -> Option<i32> {
        if query_tile >= self.num_query_tiles() {
            return None;
        }
        i32::try_from(query_tile).ok()
    }
}
