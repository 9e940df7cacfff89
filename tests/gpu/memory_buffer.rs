//! Memory buffers (`MemoryBuffer`, `Attention::memory_append`): windows appended from the
//! buffer's type and from f32 (cast), from strided views, with and without a mask, growing and
//! evicting, checked entry by entry against a host model of the same appends; the memory layer
//! over a buffer's views bit for bit as over the same entries concatenated contiguously; errors.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::attention::memory::{MemoryBuffer, MemoryGrowth};
use longflash::{Element, Error, Input, Layout, MemoryForward, MemoryInput, Output};

use crate::common::*;

/// One memory entry: its key row, value row and mask byte.
type Entry = (Vec<f32>, Vec<f32>, u8);

/// The host model: per sequence, the entry of each slot.
struct Model {
    slots: Vec<Vec<Entry>>,
    capacity: usize,
    next: usize,
    growth: MemoryGrowth,
}

impl Model {
    fn append(&mut self, rows: Vec<Vec<Entry>>) {
        let window = rows[0].len();
        let len = self.slots[0].len();
        if len + window > self.capacity && self.growth == MemoryGrowth::Grow {
            self.capacity = (len + window).max(2 * self.capacity);
        }
        let cap = self.capacity;
        let skip = window.saturating_sub(cap);
        for (b, r) in rows.into_iter().enumerate() {
            let mut slot = self.next;
            for e in r.into_iter().skip(skip) {
                if slot < self.slots[b].len() {
                    self.slots[b][slot] = e;
                } else {
                    self.slots[b].push(e);
                }
                slot = (slot + 1) % cap;
            }
        }
        self.next = (self.next + window - skip) % cap;
        if self.growth == MemoryGrowth::Grow {
            self.next = self.slots[0].len();
        }
    }
}

/// Appends windows to a buffer of `T` from `S` values and checks it after each.
fn appends_t<T: Element, S: longflash::attention::memory::AppendSource>(
    g: &Gpu,
    to_s: impl Fn(f32) -> S,
    (batch, heads, d): (usize, usize, usize),
    growth: MemoryGrowth,
    with_mask: bool,
    seed: u64,
) {
    let s = &g.stream;
    let mut rng = Rng(seed);
    let capacity = 100;
    let mut buf = MemoryBuffer::<T>::new(s, batch, heads, d, capacity, growth).unwrap();
    let mut model = Model {
        slots: vec![Vec::new(); batch],
        capacity,
        next: 0,
        growth,
    };
    for window in [37usize, 64, 130, 5, 1, 250] {
        // Keys and values interleaved per row ([batch, window, 2, heads, d] with heads of
        // stride d): strided views of one allocation.
        let packed: Vec<f32> = (0..batch * window * 2 * heads * d)
            .map(|_| T::from_f32(rng.normal() as f32).to_f32())
            .collect();
        let mask: Vec<u8> = (0..batch * window)
            .map(|_| (rng.uniform() < 0.7) as u8)
            .collect();
        let l = Layout {
            batch,
            seqlen: window,
            heads,
            head_dim: d,
            batch_stride: (window * 2 * heads * d) as i64,
            seq_stride: (2 * heads * d) as i64,
            head_stride: d as i64,
        };
        let dev: CudaSlice<S> = s
            .clone_htod(&packed.iter().map(|&x| to_s(x)).collect::<Vec<_>>())
            .unwrap();
        let dmask = s.clone_htod(&mask).unwrap();
        {
            let kv = dev.as_view();
            let vv = dev.slice(heads * d..);
            let mv = dmask.as_view();
            g.attn
                .memory_append(
                    s,
                    &mut buf,
                    Input {
                        data: &kv,
                        layout: l,
                    },
                    Input {
                        data: &vv,
                        layout: l,
                    },
                    with_mask.then_some(&mv),
                )
                .unwrap();
        }
        let rows = (0..batch)
            .map(|b| {
                (0..window)
                    .map(|t| {
                        let at = ((b * window + t) * 2) * heads * d;
                        (
                            packed[at..at + heads * d].to_vec(),
                            packed[at + heads * d..at + 2 * heads * d].to_vec(),
                            if with_mask { mask[b * window + t] } else { 1 },
                        )
                    })
                    .collect()
            })
            .collect();
        model.append(rows);
        // The buffer's held entries against the model.
        let views = buf.views();
        let ml = views.layout;
        let len = model.slots[0].len();
        assert_eq!(
            (buf.len(), ml.seqlen),
            (len, len),
            "{growth:?} window {window}"
        );
        assert_eq!(buf.capacity(), model.capacity);
        let keys: Vec<T> = s.clone_dtoh(&views.keys).unwrap();
        let values: Vec<T> = s.clone_dtoh(&views.values).unwrap();
        assert_eq!(views.mask.is_some(), with_mask);
        let bmask: Vec<u8> = match &views.mask {
            Some(m) => s.clone_dtoh(m).unwrap(),
            None => vec![1; batch * len],
        };
        for b in 0..batch {
            for (j, (k, v, m)) in model.slots[b].iter().enumerate() {
                let at = b * ml.batch_stride as usize + j * ml.seq_stride as usize;
                let got_k: Vec<f32> = keys[at..at + heads * d]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let got_v: Vec<f32> = values[at..at + heads * d]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                assert_eq!(&got_k, k, "{growth:?}: keys of sequence {b} slot {j}");
                assert_eq!(&got_v, v, "{growth:?}: values of sequence {b} slot {j}");
                assert_eq!(
                    bmask[b * len + j],
                    *m,
                    "{growth:?}: mask of sequence {b} slot {j}"
                );
            }
        }
    }
}

#[test]
fn memory_buffer_appends_windows() {
    let g = gpu_or_skip!();
    for growth in [MemoryGrowth::Grow, MemoryGrowth::EvictOldest] {
        for (batch, with_mask) in [(1, true), (3, true), (2, false)] {
            appends_t::<bf16, bf16>(g, bf16::from_f32, (batch, 2, 64), growth, with_mask, 1);
            appends_t::<bf16, f32>(g, |x| x, (batch, 3, 100), growth, with_mask, 2);
            appends_t::<f16, f16>(g, f16::from_f32, (batch, 1, 128), growth, with_mask, 3);
            appends_t::<f16, f32>(g, |x| x, (batch, 2, 256), growth, with_mask, 4);
        }
    }
}

/// The memory layer over a buffer's views equals the layer over a contiguous copy of the same
/// entries (batch 2: the mask comes from the buffer's contiguous copy), bit for bit.
#[test]
fn memory_layer_reads_a_buffer() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, hq, hk, d, window) = (2, 4, 2, 128, 200);
    let mut rng = Rng(7);
    let mut buf = MemoryBuffer::<bf16>::new(s, b, hk, d, 64, MemoryGrowth::Grow).unwrap();
    let gen = |n: usize, rng: &mut Rng| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.normal() as f32))
            .collect()
    };
    for w in [150, 90] {
        let l = Layout::bshd(b, w, hk, d);
        let (k, v) = (gen(l.numel(), &mut rng), gen(l.numel(), &mut rng));
        let m: Vec<u8> = (0..b * w).map(|_| (rng.uniform() < 0.6) as u8).collect();
        let (dk, dv, dm) = (
            s.clone_htod(&k).unwrap(),
            s.clone_htod(&v).unwrap(),
            s.clone_htod(&m).unwrap(),
        );
        let (kv, vv, mv) = (dk.as_view(), dv.as_view(), dm.as_view());
        g.attn
            .memory_append(
                s,
                &mut buf,
                Input {
                    data: &kv,
                    layout: l,
                },
                Input {
                    data: &vv,
                    layout: l,
                },
                Some(&mv),
            )
            .unwrap();
    }
    assert_eq!(buf.len(), 240);
    let views = buf.views();
    // The contiguous copy of the held entries.
    let ml = views.layout;
    let keys: Vec<bf16> = s.clone_dtoh(&views.keys).unwrap();
    let values: Vec<bf16> = s.clone_dtoh(&views.values).unwrap();
    let mask: Vec<u8> = s.clone_dtoh(views.mask.as_ref().unwrap()).unwrap();
    let cl = Layout::bshd(b, ml.seqlen, hk, d);
    let pick = |x: &[bf16]| -> Vec<bf16> {
        let mut out = Vec::with_capacity(cl.numel());
        for bi in 0..b {
            let at = bi * ml.batch_stride as usize;
            out.extend_from_slice(&x[at..at + ml.seqlen * hk * d]);
        }
        out
    };
    let (ck, cv) = (
        s.clone_htod(&pick(&keys)).unwrap(),
        s.clone_htod(&pick(&values)).unwrap(),
    );
    let cm = s.clone_htod(&mask[..b * ml.seqlen]).unwrap();
    let ql = Layout::bshd(b, window, hq, d);
    let kl = Layout::bshd(b, window, hk, d);
    let (q, k, v) = (
        gen(ql.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
    );
    let (dq, dk, dv) = (
        s.clone_htod(&q).unwrap(),
        s.clone_htod(&k).unwrap(),
        s.clone_htod(&v).unwrap(),
    );
    let mut outs = Vec::new();
    for from_buffer in [true, false] {
        let mut o: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
        let mut lse: CudaSlice<f32> = s.alloc_zeros(b * hq * window).unwrap();
        {
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let (ckv, cvv, cmv) = (ck.as_view(), cv.as_view(), cm.as_view());
            let memory = if from_buffer {
                views.input()
            } else {
                MemoryInput {
                    keys: Input {
                        data: &ckv,
                        layout: cl,
                    },
                    values: Input {
                        data: &cvv,
                        layout: cl,
                    },
                    mask: Some(&cmv),
                }
            };
            let (mut ov, mut lv) = (o.as_view_mut(), lse.as_view_mut());
            g.attn
                .forward_memory(
                    s,
                    Input {
                        data: &qv,
                        layout: ql,
                    },
                    Input {
                        data: &kv,
                        layout: kl,
                    },
                    Input {
                        data: &vv,
                        layout: kl,
                    },
                    memory,
                    Output {
                        data: &mut ov,
                        layout: ql,
                        lse: Some(&mut lv),
                    },
                    &MemoryForward::default(),
                )
                .unwrap();
        }
        let o: Vec<u16> = s
            .clone_dtoh(&o)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let lse: Vec<u32> = s
            .clone_dtoh(&lse)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        outs.push((o, lse));
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn memory_append_rejects_bad_windows() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let mut buf = MemoryBuffer::<bf16>::new(s, 2, 2, 64, 16, MemoryGrowth::EvictOldest).unwrap();
    let l = Layout::bshd(2, 8, 2, 64);
    let x: CudaSlice<bf16> = s.alloc_zeros(l.numel() + 2).unwrap();
    let h: CudaSlice<f16> = s.alloc_zeros(l.numel()).unwrap();
    let m: CudaSlice<u8> = s.alloc_zeros(15).unwrap();
    let (xv, hv, mv) = (x.as_view(), h.as_view(), m.as_view());
    let xo = x.slice(1..);
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } | Error::Misaligned { arg, .. } => arg,
        Error::ShapeMismatch { arg, .. } | Error::OutOfBounds { arg, .. } => arg,
        other => panic!("unexpected {other:?}"),
    };
    let i = |data, layout| Input { data, layout };
    let wrong_heads = Layout::bshd(2, 8, 1, 64);
    assert_eq!(
        arg(g
            .attn
            .memory_append(s, &mut buf, i(&xv, wrong_heads), i(&xv, wrong_heads), None)
            .unwrap_err()),
        "keys.heads"
    );
    assert_eq!(
        arg(g
            .attn
            .memory_append(
                s,
                &mut buf,
                Input {
                    data: &hv,
                    layout: l
                },
                Input {
                    data: &hv,
                    layout: l
                },
                None
            )
            .unwrap_err()),
        "keys"
    );
    assert_eq!(
        arg(g
            .attn
            .memory_append(s, &mut buf, i(&xo, l), i(&xv, l), None)
            .unwrap_err()),
        "keys.ptr"
    );
    assert_eq!(
        arg(g
            .attn
            .memory_append(s, &mut buf, i(&xv, l), i(&xv, l), Some(&mv))
            .unwrap_err()),
        "mask"
    );
    let short = Layout::bshd(2, 7, 2, 64);
    assert_eq!(
        arg(g
            .attn
            .memory_append(s, &mut buf, i(&xv, l), i(&xv, short), None)
            .unwrap_err()),
        "values.seqlen"
    );
    assert!(buf.is_empty());
    match MemoryBuffer::<bf16>::new(s, 1, 1, 63, 4, MemoryGrowth::Grow) {
        Err(Error::InvalidArgument {
            arg: "head_dim", ..
        }) => {}
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
}
