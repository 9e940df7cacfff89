//! The KV append's host side: the lowering of a valid call (paged and contiguous) and the typed
//! rejections of the raw arguments, without a GPU.

use longflash::attention::RawAppend;
use longflash::layout::Layout;

fn base() -> RawAppend {
    RawAppend {
        dtype: longflash::DType::Bf16,
        k_new: 1 << 30,
        v_new: 2 << 30,
        k_cache: 3 << 30,
        v_cache: 4 << 30,
        k_new_layout: Layout::bshd(2, 3, 4, 128),
        v_new_layout: Layout::bshd(2, 3, 4, 128),
        k_cache_layout: Layout::bshd(10, 64, 4, 128),
        v_cache_layout: Layout::bshd(10, 64, 4, 128),
        block_table: 5 << 30,
        max_pages_per_seq: 5,
        cache_seqlens: 6 << 30,
        error_flag: 0,
    }
}

fn refused(a: RawAppend, arg: &str) {
    match a.validate(None) {
        Ok(_) => panic!("{arg}: accepted"),
        Err(e) => assert!(e.to_string().contains(arg), "{arg}: {e}"),
    }
}

#[test]
fn raw_append_validation() {
    let p = base().validate(None).unwrap();
    assert_eq!(
        (p.capacity, p.page_size, p.page_shift, p.num_pages),
        (320, 64, 6, 10)
    );
    assert_eq!(
        (p.batch, p.seqlen_new, p.heads_kv, p.head_dim, p.rotate),
        (2, 3, 4, 128, 0)
    );
    let contiguous = RawAppend {
        block_table: 0,
        k_cache_layout: Layout::bshd(2, 100, 4, 128),
        v_cache_layout: Layout::bshd(2, 100, 4, 128),
        ..base()
    };
    assert_eq!(contiguous.validate(None).unwrap().capacity, 100);
    refused(
        RawAppend {
            k_cache_layout: Layout::bshd(3, 100, 4, 128),
            v_cache_layout: Layout::bshd(3, 100, 4, 128),
            ..contiguous
        },
        "k.batch",
    );
    refused(
        RawAppend {
            k_cache_layout: Layout::bshd(10, 48, 4, 128),
            v_cache_layout: Layout::bshd(10, 48, 4, 128),
            ..base()
        },
        "k.seqlen",
    );
    refused(
        RawAppend {
            max_pages_per_seq: 0,
            ..base()
        },
        "max_pages_per_seq",
    );
    refused(
        RawAppend {
            k_new_layout: Layout::bshd(2, 3, 4, 127),
            ..base()
        },
        "k_new.head_dim",
    );
    refused(
        RawAppend {
            v_new_layout: Layout::bshd(2, 4, 4, 128),
            ..base()
        },
        "v_new.seqlen",
    );
    refused(
        RawAppend {
            k_cache_layout: Layout::bshd(10, 64, 2, 128),
            v_cache_layout: Layout::bshd(10, 64, 2, 128),
            ..base()
        },
        "k.heads",
    );
    refused(
        RawAppend {
            cache_seqlens: 0,
            ..base()
        },
        "cache_seqlens.ptr",
    );
    refused(
        RawAppend {
            v_cache: (3 << 30) + 64,
            ..base()
        },
        "`v` overlaps `k`",
    );
    refused(
        RawAppend {
            k_new: 3 << 30,
            ..base()
        },
        "`k` overlaps `k_new`",
    );
    let mut self_overlap = base().k_cache_layout;
    self_overlap.seq_stride = 8;
    refused(
        RawAppend {
            k_cache_layout: self_overlap,
            ..base()
        },
        "k",
    );
}
