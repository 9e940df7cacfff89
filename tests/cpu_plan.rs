//! The kernels' tile plan (`longflash::plan`, which runs the C plan of
//! cuda/include/longflash/tile_plan.h) against the dense mask definition
//! `MaskSpec::is_visible`, and the mask's rejections. CPU only.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::plan::{
    backward_dq_tile_shape, backward_tall_tile_shape, backward_tile_shape, forward_tile_shape,
    Plan, PlannedTile, TileKind, TileShape,
};
use longflash::sys;
use proptest::prelude::*;
use proptest::sample::select;

fn tile_shapes() -> [TileShape; 3] {
    [64, 128, 256].map(|d| forward_tile_shape(d).expect("a forward tile shape"))
}

#[test]
fn forward_tile_shapes_come_from_the_header() {
    let want = [
        (64, sys::LF_FWD_BR_D64, sys::LF_FWD_BC_D64),
        (128, sys::LF_FWD_BR_D128, sys::LF_FWD_BC_D128),
        (256, sys::LF_FWD_BR_D256, sys::LF_FWD_BC_D256),
    ];
    for (d, br, bc) in want {
        assert_eq!(
            forward_tile_shape(d),
            Some(TileShape {
                br: br as usize,
                bc: bc as usize
            })
        );
    }
    for d in [0, 1, 32, 63, 65, 96, 127, 192, 255, 257, 512] {
        assert_eq!(forward_tile_shape(d), None, "head_dim {d}");
    }
}

fn plan(mask: MaskSpec, sq: usize, sk: usize, br: usize, bc: usize) -> Plan {
    Plan::new(&mask, sq, sk, TileShape { br, bc }).unwrap()
}

#[test]
fn causal_square_by_hand() {
    // Rows 0..128 see keys up to their own index: both key tiles they touch hold the diagonal.
    // Rows 128..256 see all of keys 0..128, and the diagonal in tiles 2 and 3.
    let p = plan(MaskSpec::causal(), 256, 256, 128, 64);
    assert_eq!(p.render(), "++..\n##++\n");
    assert_eq!(p.num_query_tiles(), 2);
    assert_eq!(p.num_key_tiles(), 4);
    assert_eq!(p.visited_tiles(), 6);
    assert_eq!(p.computed_pairs(), 128 * 128 + 128 * 256);
    assert_eq!(
        p.key_tiles(0),
        vec![
            PlannedTile {
                key_tile: 0,
                kind: TileKind::Partial
            },
            PlannedTile {
                key_tile: 1,
                kind: TileKind::Partial
            },
        ]
    );
    assert!(p.key_tiles(2).is_empty());
    assert_eq!(p.key_tile_range(7), 0..0);

    // 1024 x 1024: query tile r visits key tiles 0..=2r+1, of which the last two are partial.
    let p = plan(MaskSpec::causal(), 1024, 1024, 128, 64);
    assert_eq!(p.visited_tiles(), (0..8).map(|r| 2 * r + 2).sum::<usize>());
    let full: usize = (0..8)
        .map(|qt| {
            p.key_tiles(qt)
                .iter()
                .filter(|t| t.kind == TileKind::Full)
                .count()
        })
        .sum();
    assert_eq!(full, (0..8).map(|r| 2 * r).sum::<usize>());
}

#[test]
fn dense_and_ragged_edges_by_hand() {
    // No mask, 200 queries over 100 keys: key tile 1 (keys 64..100) ends past seqlen_k.
    let p = plan(MaskSpec::none(), 200, 100, 128, 64);
    assert_eq!(p.render(), "#+\n#+\n");
    assert_eq!(p.computed_pairs(), 200 * 100);

    // Causal with 300 queries over 100 keys (offset -200): rows below 200 see nothing.
    let p = plan(MaskSpec::causal(), 300, 100, 128, 64);
    assert_eq!(p.render(), "..\n+.\n++\n");
    assert!(p.key_tiles(0).is_empty());

    // One query, one key.
    let p = plan(MaskSpec::causal(), 1, 1, 64, 64);
    assert_eq!(p.render(), "+\n");
    assert_eq!(p.computed_pairs(), 1);
}

#[test]
fn sliding_window_by_hand() {
    // Causal window of 64 keys back, 64 x 64 tiles: query tile r touches key tiles r-1 and r,
    // both partial (window edge, diagonal).
    let p = plan(MaskSpec::causal_window(64), 512, 512, 64, 64);
    let mut want = String::from("+.......\n");
    for r in 1..8 {
        let mut line = vec!['.'; 8];
        line[r - 1] = '+';
        line[r] = '+';
        want.extend(line);
        want.push('\n');
    }
    assert_eq!(p.render(), want);
    assert_eq!(p.computed_pairs(), 64 * 64 * 15);
    // Visible pairs: sum over i of min(i, 64) + 1.
    let visible: u64 = (0..512u64).map(|i| i.min(64) + 1).sum();
    assert_eq!(visible, 31200);
    assert!(p.computed_pairs() >= visible);

    // A window of 0 on both sides over equal lengths is the diagonal only.
    let p = plan(
        MaskSpec::sliding_window(Some(0), Some(0)),
        256,
        256,
        128,
        64,
    );
    assert_eq!(p.render(), "++..\n..++\n");
}

/// Sequence lengths that hurt: 1, primes, multiples of 64 and 128 and their neighbours, and
/// anything in 1..=700.
fn seqlen() -> impl Strategy<Value = usize> {
    let special: Vec<usize> = vec![
        1, 2, 3, 5, 7, 13, 31, 61, 67, 127, 131, 251, 257, 509, 521, 673, 691, 63, 64, 65, 128,
        129, 191, 192, 193, 255, 256, 320, 383, 384, 385, 447, 448, 449, 511, 512, 513, 575, 576,
        577, 639, 640, 641, 699, 700,
    ];
    prop_oneof![2 => select(special), 1 => 1usize..=700]
}

fn window() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        Just(Some(0)),
        (1u32..=20).prop_map(Some),
        (21u32..=300).prop_map(Some),
        (700u32..=5000).prop_map(Some),
        Just(Some(i32::MAX as u32)),
    ]
}

fn mask() -> impl Strategy<Value = MaskSpec> {
    (any::<bool>(), window(), window()).prop_map(|(causal, left, right)| MaskSpec {
        sink_tokens: 0,
        causal,
        window_left: left,
        window_right: if causal {
            right.filter(|&r| r == 0)
        } else {
            right
        },
    })
}

/// Checks every query tile's plan against the dense mask for all three forward tile shapes.
fn check_against_dense(m: MaskSpec, sq: usize, sk: usize) -> Result<(), TestCaseError> {
    let visible: Vec<bool> = (0..sq * sk)
        .map(|x| m.is_visible(sq, sk, x / sk, x % sk))
        .collect();
    let total_visible = visible.iter().filter(|&&x| x).count() as u64;

    for shape in tile_shapes() {
        let TileShape { br, bc } = shape;
        let p = Plan::new(&m, sq, sk, shape).unwrap();
        let (nq, nk) = (sq.div_ceil(br), sk.div_ceil(bc));
        prop_assert_eq!(p.num_query_tiles(), nq);
        prop_assert_eq!(p.num_key_tiles(), nk);

        // Visible elements per (query tile, key tile).
        let mut count = vec![0usize; nq * nk];
        for i in 0..sq {
            for j in 0..sk {
                if visible[i * sk + j] {
                    count[(i / br) * nk + j / bc] += 1;
                }
            }
        }

        let mut visited = 0;
        let mut pairs = 0u64;
        let picture = p.render();
        let lines: Vec<&str> = picture.lines().collect();
        prop_assert_eq!(lines.len(), nq);
        for qt in 0..nq {
            let rows = (qt * br + br).min(sq) - qt * br;
            let range = p.key_tile_range(qt);
            if !range.is_empty() {
                prop_assert!(
                    range.start >= 0 && range.end <= nk as i64,
                    "query tile {}: range {:?} outside 0..{}",
                    qt,
                    range,
                    nk
                );
            }
            let want: Vec<PlannedTile> = (0..nk)
                .filter(|&t| count[qt * nk + t] > 0)
                .map(|t| PlannedTile {
                    key_tile: t,
                    kind: if (t + 1) * bc <= sk && count[qt * nk + t] == rows * bc {
                        TileKind::Full
                    } else {
                        TileKind::Partial
                    },
                })
                .collect();
            let got = p.key_tiles(qt);
            prop_assert_eq!(
                &got,
                &want,
                "mask {:?}, sq {}, sk {}, shape {:?}, query tile {}\n{}",
                m,
                sq,
                sk,
                shape,
                qt,
                picture
            );
            visited += got.len();
            pairs += got
                .iter()
                .map(|t| (rows * ((t.key_tile * bc + bc).min(sk) - t.key_tile * bc)) as u64)
                .sum::<u64>();
            let line: Vec<char> = lines[qt].chars().collect();
            prop_assert_eq!(line.len(), nk);
            for (t, &c) in line.iter().enumerate() {
                let kind = got.iter().find(|x| x.key_tile == t).map(|x| x.kind);
                let want_c = match kind {
                    None => '.',
                    Some(TileKind::Full) => '#',
                    Some(TileKind::Partial) => '+',
                };
                prop_assert_eq!(c, want_c);
            }
        }
        prop_assert!(p.key_tiles(nq).is_empty());
        prop_assert_eq!(p.visited_tiles(), visited);
        prop_assert_eq!(p.computed_pairs(), pairs);
        prop_assert!(p.computed_pairs() >= total_visible);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plan_visits_exactly_the_tiles_with_visible_elements(
        m in mask(), sq in seqlen(), sk in seqlen(),
    ) {
        check_against_dense(m, sq, sk)?;
    }

    #[test]
    fn c_visibility_matches_the_rust_definition(
        m in mask(),
        sq in prop_oneof![seqlen(), 1usize..=i32::MAX as usize],
        sk in prop_oneof![seqlen(), 1usize..=i32::MAX as usize],
        points in proptest::collection::vec((any::<u64>(), any::<u64>(), -3i64..=3), 64),
    ) {
        let p = Plan::new(&m, sq, sk, TileShape { br: 64, bc: 64 }).unwrap();
        let off = sk as i64 - sq as i64;
        for (a, b, delta) in points {
            // Half the points near the diagonal or a window edge, half anywhere (including
            // just past the ends of the sequences).
            let i = (a % (sq as u64 + 2)) as usize;
            let j = if b % 2 == 0 {
                let edge = match (b / 2) % 3 {
                    0 => 0,
                    1 => -(m.window_left.unwrap_or(0) as i64),
                    _ => m.window_right.unwrap_or(0) as i64,
                };
                (i as i64 + off + edge + delta).max(0) as usize
            } else {
                (b / 2 % (sk as u64 + 2)) as usize
            };
            prop_assert_eq!(
                p.visible(i, j),
                m.is_visible(sq, sk, i, j),
                "mask {:?}, sq {}, sk {}, i {}, j {}", m, sq, sk, i, j
            );
        }
    }
}

#[test]
fn every_small_problem_matches_the_dense_plan() {
    // Exhaustive over small lengths and a set of windows.
    let windows = [
        None,
        Some(0),
        Some(1),
        Some(3),
        Some(64),
        Some(65),
        Some(1000),
    ];
    for sq in (1..=9).chain([63, 64, 65, 129]) {
        for sk in (1..=9).chain([63, 64, 65, 129]) {
            for causal in [false, true] {
                for left in windows {
                    for right in windows {
                        if causal && right.is_some_and(|r| r != 0) {
                            continue;
                        }
                        let m = MaskSpec {
                            sink_tokens: 0,
                            causal,
                            window_left: left,
                            window_right: right,
                        };
                        check_against_dense(m, sq, sk).unwrap();
                    }
                }
            }
        }
    }
}

#[test]
fn resolve_rejects_masks_the_kernels_do_not_define() {
    let causal_right = MaskSpec {
        sink_tokens: 0,
        causal: true,
        window_left: None,
        window_right: Some(1),
    };
    assert!(matches!(
        causal_right.resolve(8, 8),
        Err(Error::InvalidMask {
            arg: "mask.window_right",
            ..
        })
    ));
    let causal_zero = MaskSpec {
        sink_tokens: 0,
        window_right: Some(0),
        ..causal_right
    };
    let r = causal_zero.resolve(8, 8).unwrap();
    assert_eq!((r.window_left, r.window_right), (-1, 0));

    let too_far = i32::MAX as u32 + 1;
    for w in [too_far, u32::MAX] {
        assert!(matches!(
            MaskSpec::sliding_window(Some(w), None).resolve(8, 8),
            Err(Error::InvalidMask {
                arg: "mask.window_left",
                ..
            })
        ));
        assert!(matches!(
            MaskSpec::sliding_window(None, Some(w)).resolve(8, 8),
            Err(Error::InvalidMask {
                arg: "mask.window_right",
                ..
            })
        ));
        assert!(matches!(
            MaskSpec::causal_window(w).resolve(8, 8),
            Err(Error::InvalidMask {
                arg: "mask.window_left",
                ..
            })
        ));
    }
    let widest = MaskSpec::sliding_window(Some(i32::MAX as u32), Some(i32::MAX as u32))
        .resolve(8, 3)
        .unwrap();
    assert_eq!(
        widest,
        sys::LfMask {
            seqlen_q: 8,
            seqlen_k: 3,
            window_left: i32::MAX,
            window_right: i32::MAX,
            sink_tokens: 0,
            reserved: 0,
        }
    );

    assert!(matches!(
        MaskSpec::none().resolve(0, 8),
        Err(Error::ZeroSized { arg: "q", .. })
    ));
    assert!(matches!(
        MaskSpec::causal().resolve(8, 0),
        Err(Error::ZeroSized { arg: "k", .. })
    ));
    let too_long = i32::MAX as usize + 1;
    assert!(matches!(
        MaskSpec::none().resolve(too_long, 8),
        Err(Error::InvalidArgument { arg: "q", .. })
    ));
    assert!(matches!(
        MaskSpec::none().resolve(8, too_long),
        Err(Error::InvalidArgument { arg: "k", .. })
    ));
}

#[test]
fn plan_new_rejects_what_resolve_rejects_and_empty_tiles() {
    let shape = TileShape { br: 64, bc: 64 };
    let causal_right = MaskSpec {
        sink_tokens: 0,
        causal: true,
        window_left: None,
        window_right: Some(2),
    };
    assert!(matches!(
        Plan::new(&causal_right, 8, 8, shape),
        Err(Error::InvalidMask { .. })
    ));
    assert!(matches!(
        Plan::new(&MaskSpec::none(), 0, 8, shape),
        Err(Error::ZeroSized { .. })
    ));
    assert!(matches!(
        Plan::new(&MaskSpec::none(), 8, 8, TileShape { br: 0, bc: 64 }),
        Err(Error::InvalidArgument {
            arg: "shape.br",
            ..
        })
    ));
    assert!(matches!(
        Plan::new(
            &MaskSpec::none(),
            8,
            8,
            TileShape {
                br: 64,
                bc: i32::MAX as usize + 1
            }
        ),
        Err(Error::InvalidArgument {
            arg: "shape.bc",
            ..
        })
    ));
}

#[test]
fn longest_sequences_keep_the_plan_in_range() {
    // Near i32::MAX tokens the tile indices and window sums must not overflow.
    let n = i32::MAX as usize;
    for m in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(i32::MAX as u32),
        MaskSpec::sliding_window(Some(i32::MAX as u32), Some(i32::MAX as u32)),
        MaskSpec::sliding_window(Some(5), Some(7)),
    ] {
        for shape in tile_shapes() {
            let p = Plan::new(&m, n, n, shape).unwrap();
            let nk = n.div_ceil(shape.bc) as i64;
            for qt in [0, 1, p.num_query_tiles() / 2, p.num_query_tiles() - 1] {
                let r = p.key_tile_range(qt);
                assert!(
                    !r.is_empty() && r.start >= 0 && r.end <= nk,
                    "{m:?} {qt} {r:?}"
                );
                // Row qt*br sees key qt*br (the diagonal) in every one of these masks.
                let diag_tile = (qt * shape.br / shape.bc) as i64;
                assert!(r.contains(&diag_tile), "{m:?} {qt} {r:?}");
            }
        }
    }
}

proptest! {
    /// The per-row key interval the kernels' element mask uses equals the dense mask.
    #[test]
    fn row_key_bounds_match_the_dense_mask(
        sq in 1usize..300, sk in 1usize..300, causal: bool,
        wl in prop::option::of(0u32..320), wr in prop::option::of(0u32..320),
        sinks in prop_oneof![Just(0u32), 1u32..80, 200u32..400],
    ) {
        let m = MaskSpec { sink_tokens: sinks, causal, window_left: wl, window_right: if causal { None } else { wr } };
        let plan = Plan::new(&m, sq, sk, TileShape { br: 64, bc: 64 }).unwrap();
        for i in 0..sq + 2 {
            let r = plan.row_keys(i);
            for j in 0..sk + 2 {
                prop_assert_eq!(r.contains(j as i64), m.is_visible(sq, sk, i, j), "row {} key {}", i, j);
                prop_assert_eq!(plan.visible(i, j), m.is_visible(sq, sk, i, j), "row {} key {}", i, j);
            }
        }
    }
}

proptest! {
    /// With attention sinks, a 128 x 64 block is Full exactly when all of its elements are
    /// visible (the classification block-sparse masks use).
    #[test]
    fn full_blocks_with_sinks_match_the_dense_mask(
        sq in 1usize..400, sk in 1usize..400, causal: bool,
        wl in prop::option::of(0u32..300), sinks in 0u32..300,
    ) {
        let m = MaskSpec { sink_tokens: sinks, causal, window_left: wl, window_right: None };
        let shape = TileShape { br: 128, bc: 64 };
        let plan = Plan::new(&m, sq, sk, shape).unwrap();
        for qb in 0..sq.div_ceil(128) {
            for kb in 0..sk.div_ceil(64) {
                let rows = qb * 128..((qb + 1) * 128).min(sq);
                let all = kb * 64 + 64 <= sk
                    && rows.clone().all(|i| (kb * 64..kb * 64 + 64).all(|j| m.is_visible(sq, sk, i, j)));
                prop_assert_eq!(plan.tile_is_full(qb, kb), all, "block ({}, {})", qb, kb);
            }
        }
    }
}

/// The backward's tile shapes, from the header.
#[test]
fn backward_tile_shapes_come_from_the_header() {
    for (d, br, bc) in [
        (64, sys::LF_BWD_BR_D64, sys::LF_BWD_BC_D64),
        (128, sys::LF_BWD_BR_D128, sys::LF_BWD_BC_D128),
        (256, sys::LF_BWD_BR_D256, sys::LF_BWD_BC_D256),
    ] {
        let shape = backward_tile_shape(d).expect("a backward tile shape");
        assert_eq!((shape.br, shape.bc), (br as usize, bc as usize));
        // The workspace pads rows to whole query tiles of both the main kernel and the dQ pass.
        assert_eq!(sys::LF_BWD_ROW_PAD as usize % shape.br, 0);
        let dq = backward_dq_tile_shape(d).expect("a dQ pass tile shape");
        assert_eq!(sys::LF_BWD_ROW_PAD as usize % dq.br, 0);
    }
    for d in [0, 32, 96, 100, 512] {
        assert_eq!(backward_tile_shape(d), None, "head_dim {d}");
        assert_eq!(backward_dq_tile_shape(d), None, "head_dim {d}");
    }
    // The taller kernels at head dims 64 and 256: the same keys, whole workspace tiles too.
    for (d, br, bc) in [
        (64, sys::LF_BWD_TALL_BR_D64, sys::LF_BWD_BC_D64),
        (256, sys::LF_BWD_TALL_BR_D256, sys::LF_BWD_BC_D256),
    ] {
        let tall = backward_tall_tile_shape(d).expect("a tall tile shape");
        assert_eq!((tall.br, tall.bc), (br as usize, bc as usize));
        assert!(tall.br > backward_tile_shape(d).unwrap().br);
        assert_eq!(sys::LF_BWD_ROW_PAD as usize % tall.br, 0);
    }
    for d in [32, 100, 128] {
        assert_eq!(backward_tall_tile_shape(d), None, "head_dim {d}");
    }
}

#[test]
fn causal_query_tiles_by_hand() {
    // 256 x 256 causal, 64 x 64 tiles: key tile t is seen by query tiles t..4.
    let p = plan(MaskSpec::causal(), 256, 256, 64, 64);
    for kt in 0..4 {
        assert_eq!(p.query_tile_range(kt), kt as i64..4);
    }
    assert_eq!(p.query_tile_range(4), 0..0);
    // seqlen_q > seqlen_k, bottom-right: the first 100 queries see no key.
    let p = plan(MaskSpec::causal(), 300, 200, 64, 64);
    assert_eq!(p.query_tile_range(0), 1..5);
    // A left window of 10 over 1000 x 1000: key tile 3 (keys 192..256) is seen by rows 192..266.
    let p = plan(MaskSpec::causal_window(10), 1000, 1000, 64, 64);
    assert_eq!(p.query_tile_range(3), 3..5);
}

/// For every key tile, the backward visits exactly the query tiles that hold a row seeing one of
/// its keys: the transpose of the forward's plan, checked element by element.
fn check_query_tiles(
    m: MaskSpec,
    sq: usize,
    sk: usize,
    br: usize,
    bc: usize,
) -> Result<(), TestCaseError> {
    let p = plan(m, sq, sk, br, bc);
    for kt in 0..p.num_key_tiles() {
        let range = p.query_tile_range(kt);
        prop_assert!(
            range.start >= 0 && range.end <= p.num_query_tiles() as i64,
            "kt {}: {:?}",
            kt,
            range
        );
        let keys = kt * bc..((kt + 1) * bc).min(sk);
        for qt in 0..p.num_query_tiles() {
            let rows = qt * br..((qt + 1) * br).min(sq);
            let sees = rows
                .clone()
                .any(|i| keys.clone().any(|j| m.is_visible(sq, sk, i, j)));
            prop_assert_eq!(
                range.contains(&(qt as i64)),
                sees,
                "mask {:?}, sq {}, sk {}, tiles {}x{}: key tile {} and query tile {}",
                m,
                sq,
                sk,
                br,
                bc,
                kt,
                qt
            );
            // The forward's plan visits the same pairs.
            prop_assert_eq!(
                p.key_tile_range(qt).contains(&(kt as i64)),
                sees,
                "forward plan, key tile {} query tile {}",
                kt,
                qt
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn backward_visits_exactly_the_query_tiles_with_visible_elements(
        m in mask(), sq in seqlen(), sk in seqlen(), d in select(vec![64usize, 128, 256]),
    ) {
        let shape = backward_tile_shape(d).unwrap();
        check_query_tiles(m, sq, sk, shape.br, shape.bc)?;
    }
}
