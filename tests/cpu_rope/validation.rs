//! Validation

use super::*;

fn base_cfg() -> RopeConfig {
    RopeConfig::llama(64)
}

fn cfg_err(c: RopeConfig) -> &'static str {
    let e = c
        .validate(64)
        .expect_err(&format!("{c:?} should be rejected"));
    // inv_freq reports the same error.
    assert_eq!(c.inv_freq(64, 1).unwrap_err(), e);
    arg_of(&e)
}

#[test]
fn validation_rejects_bad_configs() {
    assert!(base_cfg().validate(64).is_ok());
    for rotary_dim in [0, 1, 3, 63, 66, 128] {
        let c = RopeConfig {
            rotary_dim,
            ..base_cfg()
        };
        assert_eq!(cfg_err(c), "rope.rotary_dim", "rotary_dim {rotary_dim}");
    }
    for rotary_dim in [2, 4, 32, 64] {
        assert!(RopeConfig {
            rotary_dim,
            ..base_cfg()
        }
        .validate(64)
        .is_ok());
    }
    for base in [1.0, 0.5, 0.0, -10.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(RopeConfig { base, ..base_cfg() }),
            "rope.base",
            "base {base}"
        );
    }
    let with = |scaling| RopeConfig {
        scaling,
        ..base_cfg()
    };
    let yarn =
        |factor, original_max_position, beta_fast, beta_slow, attention_factor| RopeScaling::Yarn {
            factor,
            original_max_position,
            beta_fast,
            beta_slow,
            attention_factor,
        };
    let llama3 =
        |factor, low_freq_factor, high_freq_factor, original_max_position| RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        };
    for factor in [0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
        for scaling in [
            RopeScaling::Linear { factor },
            RopeScaling::NtkAware { factor },
            RopeScaling::DynamicNtk {
                factor,
                original_max_position: 10,
            },
            yarn(factor, 10, 32.0, 1.0, None),
            llama3(factor, 1.0, 4.0, 10),
        ] {
            assert_eq!(cfg_err(with(scaling)), "rope.scaling.factor", "{scaling:?}");
        }
    }
    for scaling in [
        RopeScaling::DynamicNtk {
            factor: 2.0,
            original_max_position: 0,
        },
        yarn(2.0, 0, 32.0, 1.0, None),
        llama3(2.0, 1.0, 4.0, 0),
    ] {
        assert_eq!(
            cfg_err(with(scaling)),
            "rope.scaling.original_max_position",
            "{scaling:?}"
        );
    }
    for beta_slow in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, 32.0, beta_slow, None))),
            "rope.scaling.beta_slow"
        );
    }
    for beta_fast in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, beta_fast, 1.0, None))),
            "rope.scaling.beta_fast"
        );
    }
    for a in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, 32.0, 1.0, Some(a)))),
            "rope.scaling.attention_factor"
        );
    }
    for low in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(llama3(8.0, low, 4.0, 10))),
            "rope.scaling.low_freq_factor"
        );
    }
    for high in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(llama3(8.0, 1.0, high, 10))),
            "rope.scaling.high_freq_factor"
        );
    }
    // The boundaries that are fine.
    for scaling in [
        RopeScaling::Linear { factor: 1.0 },
        RopeScaling::NtkAware { factor: 1.0 },
        RopeScaling::DynamicNtk {
            factor: 1.0,
            original_max_position: 1,
        },
        yarn(1.0, 1, 1.5, 1.0, Some(0.5)),
        llama3(1.0, 0.5, 0.75, 1),
    ] {
        assert!(with(scaling).validate(64).is_ok(), "{scaling:?}");
    }
}

#[test]
fn validation_rejects_bad_options() {
    let ok = |mode| opts(RopeConfig::llama(8), mode);
    let err = |o: &RopeOptions, batch, sq, sk| -> &'static str {
        arg_of(
            &o.validate(8, batch, sq, sk)
                .expect_err(&format!("{o:?} should be rejected")),
        )
    };
    assert!(ok(PositionMode::Rope).validate(8, 2, 5, 5).is_ok());
    assert!(ok(PositionMode::ReRope { window: 1 })
        .validate(8, 2, 5, 5)
        .is_ok());
    for mode in [
        PositionMode::ReRope { window: 0 },
        PositionMode::LeakyReRope {
            window: 0,
            leak: 2.0,
        },
    ] {
        assert_eq!(err(&ok(mode), 1, 4, 4), "rope.window");
    }
    for leak in [1.0, 0.5, 0.0, -3.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            err(&ok(PositionMode::LeakyReRope { window: 2, leak }), 1, 4, 4),
            "rope.leak",
            "leak {leak}"
        );
    }
    for l in [0, 1] {
        let mut o = ok(PositionMode::Rope);
        o.log_n_train_len = Some(l);
        assert_eq!(err(&o, 1, 4, 4), "rope.log_n_train_len");
    }
    let mut o = ok(PositionMode::Rope);
    o.log_n_train_len = Some(2);
    assert!(o.validate(8, 1, 4, 4).is_ok());

    // One offset per batch entry.
    let mut o = ok(PositionMode::Rope);
    o.position_offsets = Some(vec![0, 1]);
    assert!(o.validate(8, 2, 4, 4).is_ok());
    let e = o.validate(8, 3, 4, 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                arg: "rope.position_offsets",
                value: 2,
                expected: 3,
                ..
            }
        ),
        "{e:?}"
    );
    // Positions (plus the window) must fit in i32.
    let top = i32::MAX as u32;
    o.position_offsets = Some(vec![top - 3]);
    assert!(
        o.validate(8, 1, 4, 4).is_ok(),
        "largest position exactly i32::MAX"
    );
    o.position_offsets = Some(vec![top - 2]);
    assert_eq!(err(&o, 1, 4, 4), "rope.position_offsets");
    o.position_offsets = Some(vec![u32::MAX]);
    assert_eq!(err(&o, 1, 1, 1), "rope.position_offsets");
    let mut o = ok(PositionMode::ReRope { window: 1 });
    o.position_offsets = Some(vec![top - 3]);
    assert_eq!(
        err(&o, 1, 4, 4),
        "rope.position_offsets",
        "position + window"
    );
    o.position_offsets = Some(vec![top - 4]);
    assert!(o.validate(8, 1, 4, 4).is_ok());
    // A config error comes through the options.
    let mut o = ok(PositionMode::Rope);
    o.config.rotary_dim = 10;
    assert_eq!(err(&o, 1, 4, 4), "rope.rotary_dim");
}

#[test]
fn references_report_errors() {
    let s = shape(1, 4, 4, 2, 1, 8);
    let p = problem(s, 1100);
    let bad = opts(RopeConfig::llama(8), PositionMode::ReRope { window: 0 });
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v, &bad, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.window");
    let (q, k, v) = (to_t::<f16>(&p.q), to_t::<f16>(&p.k), to_t::<f16>(&p.v));
    let e = rope_attention_lowp(&s, &q, &k, &v, &bad, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.window");
    assert_eq!(
        arg_of(&rope_rotate_q(&s, &p.q, &bad).unwrap_err()),
        "rope.window"
    );
    assert_eq!(
        arg_of(&rope_rotate_k(&s, &p.k, &bad).unwrap_err()),
        "rope.window"
    );

    let good = opts(RopeConfig::llama(8), PositionMode::Rope);
    let e = rope_attention_f64(&s, &p.q[1..], &p.k, &p.v, &good, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "q.len");
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v[1..], &good, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "v.len");
    assert_eq!(
        arg_of(&rope_rotate_q(&s, &p.q[1..], &good).unwrap_err()),
        "q.len"
    );
    assert_eq!(
        arg_of(&rope_rotate_k(&s, &p.k[1..], &good).unwrap_err()),
        "k.len"
    );
    let mut off = good.clone();
    off.position_offsets = Some(vec![0, 0]);
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v, &off, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.position_offsets");
    let gqa = shape(1, 4, 4, 3, 2, 8);
    let e = rope_attention_f64(&gqa, &[0.0; 96], &[0.0; 64], &[0.0; 64], &good, 1.0).unwrap_err();
    assert!(matches!(e, Error::HeadsNotDivisible { .. }), "{e:?}");
}
