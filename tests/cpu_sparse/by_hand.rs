//! Masks checked by hand against pictures of their blocks.

use super::*;

fn block_lines(m: &BlockMask, b: usize, h: usize) -> Vec<String> {
    m.render(b, h).lines().skip(1).map(str::to_owned).collect()
}

#[test]
fn causal_and_dilated_by_hand() {
    let s = shape(1, 1, 256, 256);
    assert_eq!(
        block_lines(&patterns::causal(s).unwrap(), 0, 0),
        ["++..", "##++"]
    );

    // Segments of 2 query blocks (4 key blocks), ratio 2: head 0 keeps query blocks 0 and 2
    // and key blocks {0, 1} and {4, 5}; head 1 keeps query blocks 1 and 3 and key blocks
    // {2, 3} and {6, 7}. Each kept query block meets the diagonal in its own key blocks.
    let s = shape(1, 2, 512, 512);
    let m = patterns::dilated(s, 2, 2).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["++......", "........", "....++..", "........"]
    );
    assert_eq!(
        block_lines(&m, 0, 1),
        ["........", "..++....", "........", "......++"]
    );
    // With segments of 4 query blocks and ratio 2, query block 2 of head 0 also sees key
    // blocks 0 and 1 of the same segment, in full.
    let m = patterns::dilated(shape(1, 2, 512, 512), 4, 2).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["++......", "........", "##..++..", "........"]
    );
}

#[test]
fn strided_and_fixed_by_hand() {
    // 1024 x 1024: query block qb has kb_diag = 2 qb + 1.
    let s = shape(1, 1, 1024, 1024);
    let m = patterns::strided(s, 2, 3).unwrap();
    // qb 3: kb_diag 7; local keeps 6, 7 (partial), stride keeps 7 - 3 = 4 and 1 (full).
    assert_eq!(block_lines(&m, 0, 0)[3], ".#..#.++........");
    let m = patterns::fixed(s, 4, 1).unwrap();
    // qb 3: kb_diag 7 in group 1 (blocks 4..8); summaries are blocks 3, 7, 11, 15 (only 3 is
    // before the diagonal outside the group).
    assert_eq!(block_lines(&m, 0, 0)[3], "...###++........");
    assert_eq!(block_lines(&m, 0, 0)[0], "++..............");
}

#[test]
fn bigbird_and_longformer_by_hand() {
    // 512 x 512, no random blocks: global key block 0 (and query block 0, which holds the
    // global positions 0..64), band of 1 key block around each query block's diagonal blocks.
    let s = shape(1, 1, 512, 512);
    let m = patterns::bigbird(s, 1, 1, 0, 7, false).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["########", "#####...", "#..####.", "#....###"]
    );
    // Three random blocks per row, among the blocks not already kept.
    let m = patterns::bigbird(s, 1, 0, 3, 7, false).unwrap();
    for (qb, line) in block_lines(&m, 0, 0).iter().enumerate().skip(1) {
        let kept = line.chars().filter(|&c| c == '#').count();
        // Key block 0, the two diagonal blocks and three of the five others.
        assert_eq!(kept, 6, "query block {qb}: {line}");
    }
    // Longformer, window 10 tokens, global token 300 (key block 4, query block 2).
    let m = patterns::longformer(s, 10, &[300]).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["###.#...", ".####...", "########", "....####"]
    );
}

#[test]
fn bigbird_without_globals_has_no_global_rows() {
    // More queries than keys: query block 0 holds positions -90..=37. With no global tokens it
    // is not a global row, and its band is key block 0 alone.
    let s = shape(1, 1, 1152, 1062);
    let m = patterns::bigbird(s, 0, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 0), [0]);
    // With one global key block it is (it holds positions 0..64).
    let m = patterns::bigbird(s, 1, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 0).len(), s.num_k_blocks());
    // Query block 2 (positions 166..=293) is global only from three global key blocks on.
    let m = patterns::bigbird(s, 2, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 2), [0, 1, 2, 3, 4]);
    let m = patterns::bigbird(s, 3, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 2).len(), s.num_k_blocks());
}

#[test]
fn render_has_a_header_and_one_line_per_query_block() {
    for (sq, sk) in [(1, 1), (300, 1000), (1000, 300), (129, 65), (128, 64)] {
        let s = shape(2, 3, sq, sk);
        let m = patterns::bigbird(s, 1, 1, 2, 99, true).unwrap();
        for (b, h) in [(0, 0), (1, 2)] {
            let r = m.render(b, h);
            let lines: Vec<&str> = r.lines().collect();
            assert_eq!(lines.len(), s.num_q_blocks() + 1, "{r}");
            assert!(
                lines[0].contains(&format!("nnz={}", m.nnz())),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains("density="), "{}", lines[0]);
            assert!(lines[0].contains(&format!("seqlen_q={sq} seqlen_k={sk}")));
            for (qb, line) in lines[1..].iter().enumerate() {
                assert_eq!(line.len(), s.num_k_blocks());
                assert!(line.chars().all(|c| "#+.".contains(c)), "{line}");
                for (kb, c) in line.chars().enumerate() {
                    assert_eq!(c != '.', m.contains(b, h, qb, kb));
                }
            }
            let listed: usize = lines[1..]
                .iter()
                .map(|l| l.chars().filter(|&c| c != '.').count())
                .sum();
            let want: usize = (0..s.num_q_blocks()).map(|qb| m.row(b, h, qb).len()).sum();
            assert_eq!(listed, want);
        }
    }
}
