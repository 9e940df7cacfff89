//! Split-KV decoding through the entries a decoding loop or a CUDA graph uses: the raw entry with
//! the caller's workspace (any contents) and with split counters the caller keeps, and the safe
//! `decode_kept` with `SplitCounters`, each against the safe `decode`'s bits over repeated calls.

use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::{DType, Error, Layout, MaskSpec, Output, RawDecode, SplitCounters};

use crate::common::Gpu;
use crate::decode::{
    case, case_data, check, dev_ptr, run_on_gpu, CaseData, DecodeCase, DecodeRun, Overrides,
};

/// O (widened) and, when given, the LSE are bit for bit those of `safe`.
fn same_bits(out: &[f64], lse: Option<&[f32]>, safe: &DecodeRun, what: &str) {
    assert!(out == safe.out, "{what}: outputs differ from decode's");
    if let Some(lse) = lse {
        assert!(
            lse.iter()
                .map(|x| x.to_bits())
                .eq(safe.lse.iter().map(|x| x.to_bits())),
            "{what}: LSEs differ from decode's"
        );
    }
}

/// One `decode_kept` call of case `c` with `counters`: no error flag, and `decode`'s bits.
fn kept_matches_decode(
    g: &Gpu,
    c: &DecodeCase,
    data: &CaseData<bf16>,
    counters: &mut SplitCounters,
    safe: &DecodeRun,
    what: &str,
) {
    let opts = c.options();
    let (out, lse, flag) = run_on_gpu(g, c, data, &Overrides::default(), |q, cache, out, f| {
        g.attn
            .decode_kept(&g.stream, q, cache, out, Some(f), &opts, counters)
    });
    assert_eq!(flag, 0, "{what}: valid cache reported");
    same_bits(&out, Some(&lse), safe, what);
}

/// A long cache split many ways, and the split plan's own choice, agree with the reference; the
/// raw entry with a caller's workspace (what a CUDA graph captures) gives the safe entry's bits.
#[test]
fn splits_and_raw_workspace() {
    let g = gpu_or_skip!();
    for num_splits in [None, Some(1), Some(2), Some(7), Some(64)] {
        check(
            g,
            &DecodeCase {
                lens: vec![5000, 4097],
                heads_q: 4,
                heads_kv: 4,
                page_size: Some(128),
                num_splits,
                ..case(128, MaskSpec::causal())
            },
        );
    }

    // Raw: the same call through decode_raw with a workspace of exactly the plan's size.
    let c = DecodeCase {
        lens: vec![3000, 17],
        num_splits: Some(5),
        ..case(64, MaskSpec::causal())
    };
    let safe = check(g, &c);
    let CaseData {
        shape,
        layout: cl,
        q,
        k,
        v,
    } = case_data::<bf16>(&c);
    let ql = Layout::bshd(shape.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let (dt, dl) = (
        g.stream.clone_htod(&shape.block_table).unwrap(),
        g.stream.clone_htod(&shape.cache_seqlens).unwrap(),
    );
    let d_o: CudaSlice<bf16> = g.stream.alloc_zeros(q.len()).unwrap();
    let d_lse: CudaSlice<f32> = g.stream.alloc_zeros(safe.lse.len()).unwrap();
    // O (widened) and the LSE the raw calls wrote.
    let read_back = || -> (Vec<f64>, Vec<f32>) {
        let out = g.stream.clone_dtoh(&d_o).unwrap();
        let lse = g.stream.clone_dtoh(&d_lse).unwrap();
        (out.iter().map(|x| x.to_f64()).collect(), lse)
    };
    let mut args = RawDecode {
        dtype: DType::Bf16,
        q: dev_ptr(g, &dq),
        k: dev_ptr(g, &dk),
        v: dev_ptr(g, &dv),
        o: dev_ptr(g, &d_o),
        lse: dev_ptr(g, &d_lse),
        q_layout: ql,
        k_layout: cl,
        v_layout: cl,
        o_layout: ql,
        block_table: dev_ptr(g, &dt),
        max_pages_per_seq: shape.max_pages_per_seq,
        cache_seqlens: dev_ptr(g, &dl),
        error_flag: 0,
        options: c.options(),
        workspace: 0,
        workspace_bytes: 0,
        split_counters: 0,
        split_counters_len: 0,
    };
    let plan = g.attn.decode_plan(&args).unwrap();
    assert_eq!(plan.num_splits, 5);
    assert!(plan.workspace_bytes > 0);
    // Too small a workspace is refused before launch. Its contents need not be anything (the
    // launch zeroes the split counters): it starts as all ones.
    let ws: CudaSlice<u8> = g
        .stream
        .clone_htod(&vec![0xffu8; plan.workspace_bytes])
        .unwrap();
    args.workspace = dev_ptr(g, &ws);
    args.workspace_bytes = plan.workspace_bytes - 1;
    // SAFETY: every pointer is a live allocation of this context holding what its layout
    // addresses; the call is refused before launch.
    let err = unsafe { g.attn.decode_raw(g.stream.cu_stream(), &args) };
    assert!(err.is_err(), "a short workspace was accepted");
    args.workspace_bytes = plan.workspace_bytes;
    // The same workspace three times over, as a captured graph replays it.
    for call in 0..3 {
        // SAFETY: as above, with the plan's workspace; the stream is synchronized before the
        // buffers are read or dropped.
        unsafe { g.attn.decode_raw(g.stream.cu_stream(), &args) }.unwrap();
        let (out, lse) = read_back();
        same_bits(&out, Some(&lse), &safe, &format!("raw, call {call}"));
    }

    // Counters the caller keeps, zeroed once: no memset in the launch, the workspace's own
    // counters (all ones) unused, the same results call after call, and the counters zero
    // again after each call.
    let ws: CudaSlice<u8> = g
        .stream
        .clone_htod(&vec![0xffu8; plan.workspace_bytes])
        .unwrap();
    let counters: CudaSlice<i32> = g.stream.alloc_zeros(plan.counters).unwrap();
    assert_eq!(plan.counters, 2 * c.heads_kv * plan.row_blocks);
    let args = RawDecode {
        workspace: dev_ptr(g, &ws),
        split_counters: dev_ptr(g, &counters),
        split_counters_len: plan.counters,
        ..args
    };
    for call in 0..3 {
        // SAFETY: as above; the counters are a live zeroed allocation of plan.counters i32.
        unsafe { g.attn.decode_raw(g.stream.cu_stream(), &args) }.unwrap();
        let (out, lse) = read_back();
        same_bits(
            &out,
            Some(&lse),
            &safe,
            &format!("raw, kept counters, call {call}"),
        );
        let left: Vec<i32> = g.stream.clone_dtoh(&counters).unwrap();
        assert!(
            left.iter().all(|&x| x == 0),
            "call {call} left counters {left:?}"
        );
    }
}

/// The safe entry with counters kept across calls (no memset per call): the same bits as
/// `decode` call after call (counters left nonzero would misplace the last split's merge), and
/// too few counters for the plan refused before launch.
#[test]
fn decode_kept_counters() {
    let g = gpu_or_skip!();
    let c = DecodeCase {
        lens: vec![3000, 17, 1100],
        heads_q: 8,
        heads_kv: 2,
        num_splits: Some(5),
        ..case(128, MaskSpec::causal())
    };
    let safe = check(g, &c);
    let data = case_data::<bf16>(&c);
    let mut counters =
        SplitCounters::for_shape(&g.stream, 3, c.seqlen_q, c.heads_q, c.heads_kv).unwrap();
    assert_eq!(
        counters.len(),
        3 * 2,
        "one per (sequence, KV head): 4 rows fit one block"
    );
    assert_eq!(counters.workspace_bytes(), 0, "no workspace before a call");
    // Too few counters: refused before launch (the launch that follows fills the outputs).
    let mut short = SplitCounters::new(&g.stream, 5).unwrap();
    let opts = c.options();
    run_on_gpu(g, &c, &data, &Overrides::default(), |q, cache, out, f| {
        match g.attn.decode_kept(
            &g.stream,
            q,
            cache,
            Output {
                data: &mut *out.data,
                layout: out.layout,
                lse: None,
            },
            None,
            &opts,
            &mut short,
        ) {
            Err(Error::OutOfBounds {
                arg: "counters", ..
            }) => {}
            r => panic!("five counters for six groups: {r:?}"),
        }
        g.attn.decode(&g.stream, q, cache, out, Some(f), &opts)
    });
    let mut kept_bytes = 0;
    for call in 0..3 {
        kept_matches_decode(
            g,
            &c,
            &data,
            &mut counters,
            &safe,
            &format!("decode_kept, call {call}"),
        );
        // The first call that splits allocates the set's workspace; the calls after it reuse it.
        if call == 0 {
            kept_bytes = counters.workspace_bytes();
            assert!(kept_bytes > 0, "five splits need a workspace");
        } else {
            assert_eq!(
                counters.workspace_bytes(),
                kept_bytes,
                "call {call} reallocated"
            );
        }
    }
    assert_eq!(
        short.workspace_bytes(),
        0,
        "a refused call allocates nothing"
    );
}

/// One set of counters across calls whose plans need more and more workspace: the set's
/// workspace grows to the larger plan (the smaller one released in stream order), the bits stay
/// `decode`'s, and a smaller plan after it keeps the larger workspace.
#[test]
fn decode_kept_workspace_grows() {
    let g = gpu_or_skip!();
    let base = DecodeCase {
        lens: vec![2500, 700],
        heads_q: 4,
        heads_kv: 2,
        ..case(64, MaskSpec::none())
    };
    let mut counters =
        SplitCounters::for_shape(&g.stream, 2, base.seqlen_q, base.heads_q, base.heads_kv).unwrap();
    let mut sizes = Vec::new();
    for splits in [2, 6, 3] {
        let c = DecodeCase {
            num_splits: Some(splits),
            ..base.clone()
        };
        let safe = check(g, &c);
        let data = case_data::<bf16>(&c);
        let what = format!("decode_kept, {splits} splits");
        kept_matches_decode(g, &c, &data, &mut counters, &safe, &what);
        sizes.push(counters.workspace_bytes());
    }
    assert!(sizes[0] > 0 && sizes[1] > sizes[0], "grown: {sizes:?}");
    assert_eq!(sizes[2], sizes[1], "kept after a smaller plan: {sizes:?}");
}
