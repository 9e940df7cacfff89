//! The smollm2 example without a GPU: its command line, its tokenizer (on the real GGUF when
//! scripts/fetch-smollm2.sh has fetched it, checked against the `tokenizers` crate's byte-level
//! BPE built from the same vocabulary), and its forward with candle attention on the CPU on a
//! small random model written as a GGUF file (shapes, chunked prefill, decoding over the cache,
//! and the attention checked against longflash's f64 RoPE reference).

#[allow(dead_code)]
#[path = "../examples/smollm2/args.rs"]
mod args;
#[allow(dead_code)]
#[path = "../examples/smollm2/attention.rs"]
mod attention;
#[allow(dead_code)]
#[path = "../examples/smollm2/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../examples/smollm2/tasks.rs"]
mod tasks;
#[allow(dead_code)]
#[path = "../examples/smollm2/tokenizer.rs"]
mod tokenizer;

use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use longflash::reference::{rope_attention_f64, RefShape};
use longflash_candle::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};

use args::{parse, ArgError, Attn, Command, DTypeArg, DeviceArg, ModeArg, ScalingArg};
use attention::{Attention, Backend};
use model::{Logits, Model};

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn parse_err(s: &str) -> String {
    match parse(&argv(s)) {
        Err(ArgError(m)) => m,
        Ok(c) => panic!("`{s}` parsed as {c:?}, expected an error"),
    }
}

#[test]
fn argument_errors_are_messages() {
    for (line, needle) in [
        ("", "no command"),
        ("train", "unknown command `train`"),
        ("ppl", "needs the text FILE"),
        ("ppl a.txt b.txt", "unexpected argument `b.txt`"),
        ("generate", "needs --prompt"),
        ("generate --prompt", "--prompt needs a value"),
        ("generate --prompt hi --bogus", "unknown option `--bogus`"),
        (
            "generate --prompt hi --max-tokens 3",
            "not an option of `generate`",
        ),
        ("ppl f --max-new 3", "not an option of `ppl`"),
        (
            "ppl f --device cpu --layers 3-1 rope",
            "`3-1` is an empty range",
        ),
        (
            "ppl f --device cpu --layers x rope",
            "`x` is not a layer range",
        ),
        (
            "ppl f --device cpu --layers 0-3",
            "--layers (its mode) needs a value",
        ),
        (
            "ppl f --device cpu --layers 0-3 yarn:4",
            "`yarn:4` is not rope, rerope:W",
        ),
        (
            "ppl f --device cpu --layers 0-3 rerope",
            "`rerope` is not rope, rerope:W",
        ),
        (
            "ppl f --device cpu --layers 0-3 leaky:2k:1",
            "leak K must be above 1",
        ),
        (
            "ppl f --device cpu --layers 0-3 rerope:4k:logn:8k",
            "ends in something other than :log-n:L",
        ),
        (
            "ppl f --device cpu --layers 0-3 rerope:4k:log-n:1",
            "at least 2",
        ),
        (
            "ppl f --device cpu --layers 0-3 rerope:0",
            "window must be between 1",
        ),
        (
            "ppl f --device cpu --layers 0-3 rope --layers 3 rope",
            "3 overlaps layers 0-3 given before",
        ),
        (
            "ppl f --device cpu --attn candle --layers 0-3 rope",
            "--layers sets position modes of longflash's kernels",
        ),
        ("ppl f --max-tokens 1", "at least 2 tokens"),
        ("ppl f --max-tokens 12q", "not a count"),
        ("ppl f --segment 1", "at least 2 tokens"),
        ("passkey --segment 8k", "--segment"),
        ("ppl f --rerope 0", "window must be between 1"),
        ("ppl f --rerope", "--rerope needs a value"),
        ("ppl f --leaky 2048", "its leak K"),
        ("ppl f --leaky 2048 1", "leak K must be above 1"),
        ("ppl f --leaky 2k nan", "not a finite number"),
        ("ppl f --ntk 0.5", "factor must be at least 1"),
        (
            "ppl f --ntk 2 --yarn 2",
            "a scaling was already given (--ntk)",
        ),
        (
            "ppl f --rerope 4k --rope",
            "a position mode was already given (--rerope)",
        ),
        ("ppl f --device tpu", "not cpu, cuda or cuda:N"),
        ("ppl f --attn flash", "not longflash or candle"),
        ("ppl f --dtype f64", "not f16, bf16 or f32"),
        ("ppl f --chunk 0", "at least one token"),
        ("ppl f --log-n 1", "at least 2"),
        (
            "ppl f --device cpu --attn candle --log-n 8k",
            "needs --attn longflash",
        ),
        ("passkey --depths 0.5,1.5", "between 0 and 1"),
        ("passkey --lengths 8k,100", "at least 256 tokens"),
        ("passkey --seed -3", "not an unsigned integer"),
        ("compare", "needs --prompt-file"),
        (
            "ppl f --device cpu --attn candle --rerope 4096",
            "plain RoPE only",
        ),
        (
            "ppl f --device cpu --attn longflash",
            if cfg!(feature = "cuda") {
                "CUDA devices only"
            } else {
                "needs the `cuda` feature"
            },
        ),
    ] {
        let m = parse_err(line);
        assert!(
            m.contains(needle),
            "`{line}`: message {m:?} lacks {needle:?}"
        );
    }
    if !cfg!(feature = "cuda") {
        assert!(parse_err("ppl f --device cuda:1 --attn candle").contains("no CUDA"));
    }
}

#[test]
fn arguments_parse() {
    let Ok(Command::Ppl(c, p)) = parse(&argv(
        "ppl book.txt --device cpu --attn candle --max-tokens 32k --ntk 4 --chunk 1k --json o.json",
    )) else {
        panic!("ppl did not parse");
    };
    assert_eq!(p.max_tokens, 32 * 1024);
    assert_eq!(p.segment, None);
    assert_eq!(p.file.to_str(), Some("book.txt"));
    let Ok(Command::Ppl(_, seg)) = parse(&argv("ppl book.txt --device cpu --segment 8k")) else {
        panic!("ppl --segment did not parse");
    };
    assert_eq!(seg.segment, Some(8 * 1024));
    assert_eq!(p.json.as_ref().and_then(|j| j.to_str()), Some("o.json"));
    assert_eq!(
        (c.attn, c.device, c.dtype),
        (Attn::Candle, DeviceArg::Cpu, DTypeArg::F32)
    );
    assert_eq!(
        (c.mode, c.scaling, c.chunk),
        (ModeArg::Rope, ScalingArg::Ntk(4.0), 1024)
    );

    let Ok(Command::Passkey(_, p)) = parse(&argv(
        "passkey --device cpu --lengths 8k,16K,1m --depths 0,0.5,1 --seed 7",
    )) else {
        panic!("passkey did not parse");
    };
    assert_eq!(p.lengths, vec![8192, 16384, 1 << 20]);
    assert_eq!(p.depths, vec![0.0, 0.5, 1.0]);
    assert_eq!(p.seed, 7);

    let Ok(Command::Generate(c, g)) = parse(&argv("generate --device cpu --prompt hi --chat"))
    else {
        panic!("generate did not parse");
    };
    assert!(g.chat);
    assert_eq!(g.max_new, 64);
    assert_eq!(c.attn, Attn::Candle, "the CPU defaults to candle attention");
    assert_eq!(parse(&argv("ppl --help")), Ok(Command::Help));

    if cfg!(feature = "cuda") {
        let Ok(Command::Ppl(c, _)) = parse(&argv("ppl f --leaky 2k 16 --dtype bf16")) else {
            panic!("ppl with leaky did not parse");
        };
        assert_eq!(
            c.mode,
            ModeArg::Leaky {
                window: 2048,
                leak: 16.0
            }
        );
        assert_eq!((c.attn, c.dtype), (Attn::Longflash, DTypeArg::Bf16));
    }
}

/// `--layers` ranges and modes as parsed, and as the attention applies them layer by layer.
#[test]
fn per_layer_position_modes() {
    use args::{parse_layer_mode, LayerMode};
    assert_eq!(
        parse_layer_mode("12-29", "rerope:4k:log-n:8k"),
        Ok(LayerMode {
            first: 12,
            last: 29,
            mode: ModeArg::ReRope { window: 4096 },
            log_n: Some(8192),
        })
    );
    assert_eq!(
        parse_layer_mode("5", "leaky:2048:16"),
        Ok(LayerMode {
            first: 5,
            last: 5,
            mode: ModeArg::Leaky {
                window: 2048,
                leak: 16.0
            },
            log_n: None,
        })
    );
    assert_eq!(
        parse_layer_mode("0-0", "rope").map(|m| (m.mode, m.log_n)),
        Ok((ModeArg::Rope, None))
    );

    let config = RopeConfig {
        base: 100000.0,
        rotary_dim: 64,
        layout: RopeLayout::Interleaved,
        scaling: RopeScaling::None,
    };
    let plain = RopeOptions::new(config, PositionMode::Rope);
    let mut rerope = RopeOptions::new(config, PositionMode::ReRope { window: 4096 });
    rerope.log_n_train_len = Some(8192);
    let att = Attention::new(Backend::Longflash, DType::F16, plain.clone(), 64)
        .unwrap()
        .with_layer_rope(2, 4, rerope.clone())
        .unwrap();
    for (l, want) in [(0, &plain), (2, &rerope), (4, &rerope), (5, &plain)] {
        assert_eq!(att.rope_at(l), want, "layer {l}");
    }
    let att = att.with_layer_rope(4, 6, plain.clone());
    assert!(att.is_err(), "overlapping ranges");
    let other_table = RopeOptions::new(
        RopeConfig {
            scaling: RopeScaling::NtkAware { factor: 4.0 },
            ..config
        },
        PositionMode::Rope,
    );
    let lf = || Attention::new(Backend::Longflash, DType::F16, plain.clone(), 64).unwrap();
    assert!(
        lf().with_layer_rope(0, 1, other_table).is_err(),
        "another table"
    );
    assert!(
        lf().with_layer_rope(3, 1, rerope.clone()).is_err(),
        "empty range"
    );
    let bad_window = RopeOptions::new(config, PositionMode::ReRope { window: 0 });
    assert!(lf().with_layer_rope(0, 1, bad_window).is_err(), "window 0");
    let candle = Attention::new(Backend::Candle, DType::F32, plain.clone(), 64).unwrap();
    assert!(
        candle.with_layer_rope(0, 1, rerope).is_err(),
        "candle attention"
    );
}

#[test]
fn position_buckets() {
    let e = tasks::bucket_edges(32 * 1024);
    assert_eq!(e.first(), Some(&0));
    assert_eq!(e.last(), Some(&(32 * 1024)));
    assert!(e.windows(2).all(|w| w[0] < w[1]));
    let e = tasks::bucket_edges(100_000);
    assert!(*e.last().unwrap() >= 100_000 && e[e.len() - 2] < 100_000);
    assert_eq!(e[e.len() - 1], 2 * e[e.len() - 2], "doubling past 32k");
    assert_eq!(tasks::bucket_edges(10), vec![0, 1024]);
}

/// A tokenizer over single bytes plus a few merges, for the splitting rules.
fn byte_tokenizer() -> tokenizer::Tokenizer {
    let mut tokens: Vec<String> = Vec::new();
    // The byte alphabet: a byte-level tokenizer's first 256 tokens, in byte order.
    for b in 0..=255u8 {
        let c = match b {
            b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => char::from(b),
            _ => {
                let shifted = (0..b)
                    .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
                    .count() as u32;
                char::from_u32(256 + shifted).unwrap()
            }
        };
        tokens.push(c.to_string());
    }
    let merges: Vec<String> = ["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|sep|>".into());
    let mut types = vec![1; tokens.len()];
    *types.last_mut().unwrap() = 3;
    tokenizer::Tokenizer::new(tokens, &merges, &types).unwrap()
}

#[test]
fn pre_tokenizer_splits_digits_and_spaces() {
    let tok = byte_tokenizer();
    assert_eq!(
        tok.pre_tokenize("Hello  world 123!!\n\nok's  "),
        vec!["Hello", " ", " world", " ", "1", "2", "3", "!!", "\n", "\n", "ok", "'s", "  "]
    );
    // ` ?` takes a space only: a tab before a letter is a word of its own.
    assert_eq!(
        tok.pre_tokenize("x\t\ty ٣4"),
        vec!["x", "\t", "\t", "y", " ", "٣", "4"]
    );
    let ids = tok.encode("a world<|sep|> world");
    let world = tok.token_id("Ġworld").unwrap();
    let sep = tok.token_id("<|sep|>").unwrap();
    assert_eq!(ids, vec![u32::from(b'a'), world, sep, world]);
    for text in ["a world<|sep|> world", "héllo  wörld\n 42 ✓ 🦀", "", "   "] {
        assert_eq!(tok.decode(&tok.encode(text)), text);
    }
}

fn gguf_path() -> Option<std::path::PathBuf> {
    let p = tasks::model_path(None).ok()?;
    p.exists().then_some(p)
}

const TEXTS: &[&str] = &[
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 × 12,345 = 38,782.9 (approximately); call 555-0199.",
    "Unicode: naïve café, Straße, Ελληνικά, Русский, 日本語のテキスト, emoji 🦀🚀, ١٢٣.",
    "multiple   spaces\tand\ttabs\n\n\nnew lines   \n  indented\r\nwindows line",
    "don't won't it's we'll they're I'd you've I'm  'quoted' \"double\"",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "    def f(x):\n        return x**2  # square\n",
    "The pass key is 68142. Remember it. 68142 is the pass key.",
    "x\t\ty  \n  z\u{a0}\u{a0}w\u{3000}v e\u{301}te ١٢٣ ½ Ⅻ 's's 'S ''ll\n",
    "trailing spaces and a newline   \n",
];

/// The `tokenizers` crate's byte-level BPE with SmolLM2's pre-tokenizer (digits one by one,
/// then GPT-2 byte level), built from the GGUF's vocabulary and merges: the reference.
fn reference_tokenizer(ct: &Content) -> tokenizers::Tokenizer {
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};

    let strings = |key: &str| -> Vec<String> {
        ct.metadata[key]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let types: Vec<i32> = ct.metadata["tokenizer.ggml.token_type"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect();
    let merges = strings("tokenizer.ggml.merges")
        .into_iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut hf = tokenizers::Tokenizer::new(bpe);
    let pre: Vec<PreTokenizerWrapper> = vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ];
    hf.with_pre_tokenizer(Some(Sequence::new(pre)));
    hf.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    hf.add_special_tokens(specials).unwrap();
    hf
}

#[test]
fn tokenizer_on_the_real_gguf() {
    let Some(path) = gguf_path() else {
        println!("skipped: no SmolLM2 GGUF (run scripts/fetch-smollm2.sh)");
        return;
    };
    let mut file = std::fs::File::open(&path).unwrap();
    let ct = Content::read(&mut file).unwrap();
    let tok = tokenizer::Tokenizer::from_gguf(&ct).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos, tok.eos), (Some(1), Some(2)));
    let hf = reference_tokenizer(&ct);

    // A longer text: every sample, plus the passkey filler many times.
    let mut long = TEXTS.join(" ");
    long.push_str(&tasks::PASSKEY_FILLER.repeat(50));
    let mut texts: Vec<&str> = TEXTS.to_vec();
    texts.push(&long);
    for text in texts {
        let ids = tok.encode(text);
        assert_eq!(tok.decode(&ids), text, "round trip of {text:?}");
        let want = hf.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(
            ids, want,
            "ids of {text:?} differ from the tokenizers crate's"
        );
        assert_eq!(tok.decode(&ids), hf.decode(&ids, false).unwrap());
    }
    // Digits are single tokens; the chat markers are their ids.
    let ids = tok.encode("<|im_start|>12345");
    assert_eq!(ids.len(), 6);
    assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
    assert!(tok.is_special(ids[0]) && !tok.is_special(ids[1]));

    // The passkey prompt fits its length and holds the key once before the question.
    let ids = tasks::passkey_prompt(&tok, 68142, 2048, 0.5);
    assert!(
        ids.len() <= 2048 && ids.len() > 2048 - 40,
        "{} tokens",
        ids.len()
    );
    let text = tok.decode(&ids);
    assert_eq!(text.matches("68142").count(), 2);
    assert!(text.ends_with("The pass key is"));
}

/// A small LLaMA of random weights in GGUF form: 2 layers, hidden 128, 4 query heads over 2 KV
/// heads of 32, feed-forward 96, vocabulary 64; Q4_1 projections, Q8_0 embeddings, tied.
fn tiny_gguf() -> Vec<u8> {
    let dev = Device::Cpu;
    let (hidden, heads, kv, hd, ffn, vocab, layers) =
        (128usize, 4usize, 2usize, 32usize, 96usize, 64usize, 2usize);
    // Uniform values in (-amp, amp) from a hash of (seed, index): reproducible, no RNG crate.
    let q = |shape: (usize, usize), dt: GgmlDType, seed: f32| -> QTensor {
        let amp = if dt == GgmlDType::Q8_0 {
            1.0
        } else {
            1.7 / (shape.1 as f32).sqrt()
        };
        let mut state = seed.to_bits() as u64;
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                let u = (tasks::splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * amp
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &dev).unwrap();
        QTensor::quantize(&t, dt).unwrap()
    };
    let norm = |seed: f32| -> QTensor {
        let data: Vec<f32> = (0..hidden)
            .map(|i| 1.0 + 0.1 * ((i as f32 + seed).sin()))
            .collect();
        QTensor::quantize(
            &Tensor::from_vec(data, hidden, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q((vocab, hidden), GgmlDType::Q8_0, 1.0),
        ),
        ("output_norm.weight".into(), norm(2.0)),
    ];
    for l in 0..layers {
        let s = 10.0 * (l as f32 + 1.0);
        let p = |w: &str| format!("blk.{l}.{w}.weight");
        tensors.push((p("attn_norm"), norm(s)));
        tensors.push((p("ffn_norm"), norm(s + 1.0)));
        tensors.push((
            p("attn_q"),
            q((heads * hd, hidden), GgmlDType::Q4_1, s + 2.0),
        ));
        tensors.push((p("attn_k"), q((kv * hd, hidden), GgmlDType::Q4_1, s + 3.0)));
        tensors.push((p("attn_v"), q((kv * hd, hidden), GgmlDType::Q4_1, s + 4.0)));
        tensors.push((
            p("attn_output"),
            q((hidden, heads * hd), GgmlDType::Q4_1, s + 5.0),
        ));
        tensors.push((p("ffn_gate"), q((ffn, hidden), GgmlDType::Q4_1, s + 6.0)));
        tensors.push((p("ffn_up"), q((ffn, hidden), GgmlDType::Q4_1, s + 7.0)));
        tensors.push((p("ffn_down"), q((hidden, ffn), GgmlDType::Q4_1, s + 8.0)));
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv as u32)),
        ("llama.rope.freq_base", Value::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(vocab as u32)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &tensor_refs).unwrap();
    buf.into_inner()
}

fn tiny_model(scaling: RopeScaling) -> Model {
    let bytes = tiny_gguf();
    let mut r = Cursor::new(bytes);
    let ct = Content::read(&mut r).unwrap();
    let config = model::Config::from_gguf(&ct).unwrap();
    assert_eq!((config.heads, config.kv_heads, config.head_dim), (4, 2, 32));
    let rope = RopeOptions::new(config.rope(scaling), PositionMode::Rope);
    let att = Attention::new(Backend::Candle, DType::F32, rope, config.head_dim).unwrap();
    Model::from_content(&ct, &mut r, &Device::Cpu, att).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_shapes_chunks_and_decoding_agree() {
    let model = tiny_model(RopeScaling::None);
    let tokens: Vec<u32> = (0..23).map(|i| (i * 7 + 3) % 64).collect();
    let n = tokens.len();

    let mut cache = model.cache(n).unwrap();
    let all = model.forward(&tokens, &mut cache, Logits::All).unwrap();
    assert_eq!(all.dims(), &[n, 64]);
    assert_eq!(cache.len(), n);
    let (k, v) = cache.layer(1).unwrap();
    assert_eq!(
        (k.dims(), v.dims()),
        (&[1, n, 2, 32][..], &[1, n, 2, 32][..])
    );
    // The cache is full: one more token is an error, not a panic.
    assert!(model.forward(&[1], &mut cache, Logits::Last).is_err());
    assert!(model.forward(&[], &mut cache, Logits::Last).is_err());

    // Chunked prefill gives the same rows.
    let mut cache = model.cache(n).unwrap();
    let mut rows = Vec::new();
    model
        .prefill(&tokens, &mut cache, 5, Logits::All, |_, l| {
            rows.push(l.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(rows.len(), n.div_ceil(5));
    let chunked = Tensor::cat(&rows, 0).unwrap();
    let d = max_diff(&all, &chunked);
    assert!(d < 1e-3, "chunked prefill differs by {d}");

    // Decoding one token over the cache gives the last row of the full forward.
    let mut cache = model.cache(n).unwrap();
    let last = model
        .forward(&tokens[..n - 1], &mut cache, Logits::Last)
        .unwrap();
    assert_eq!(last.dims(), &[1, 64]);
    let d = max_diff(&last, &all.narrow(0, n - 2, 1).unwrap());
    assert!(d < 1e-3, "last-row logits differ by {d}");
    let step = model
        .forward(&tokens[n - 1..], &mut cache, Logits::Last)
        .unwrap();
    let d = max_diff(&step, &all.narrow(0, n - 1, 1).unwrap());
    assert!(
        d < 1e-3,
        "a decoding step differs from the full forward by {d}"
    );
    // The logits are not all alike (the check above would pass on constant rows otherwise).
    let spread = max_diff(
        &all.narrow(0, 0, 1).unwrap(),
        &all.narrow(0, n - 1, 1).unwrap(),
    );
    assert!(spread > 1e-2, "rows differ by {spread} only");
}

/// candle attention over a cache (a prefilled part, then a chunk) against longflash's f64
/// reference of RoPE attention, interleaved pairs, with and without frequency scalings.
#[test]
fn candle_attention_matches_the_rope_reference() {
    let dev = Device::Cpu;
    let (heads, kv, d) = (6usize, 2usize, 64usize);
    for (scaling, past, t) in [
        (RopeScaling::None, 0usize, 9usize),
        (RopeScaling::None, 11, 5),
        (RopeScaling::NtkAware { factor: 4.0 }, 7, 1),
        (
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position: 8,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
            },
            13,
            4,
        ),
    ] {
        let n = past + t;
        let gen = |len: usize, seed: f64| -> Vec<f64> {
            (0..len)
                .map(|i| ((i as f64 * 0.377 + seed).sin() * 1.7).tanh())
                .collect()
        };
        let q = gen(t * heads * d, 0.3);
        let k = gen(n * kv * d, 1.1);
        let v = gen(n * kv * d, 2.9);
        let config = RopeConfig {
            base: 100000.0,
            rotary_dim: d,
            layout: RopeLayout::Interleaved,
            scaling,
        };
        let rope = RopeOptions::new(config, PositionMode::Rope);
        let att = Attention::new(Backend::Candle, DType::F32, rope.clone(), d).unwrap();
        let cfg = model::Config {
            layers: 1,
            hidden: heads * d,
            heads,
            kv_heads: kv,
            head_dim: d,
            ffn: 1,
            eps: 1e-5,
            rope_base: 100000.0,
            rotary_dim: d,
            context_length: 8,
            vocab: 1,
        };
        let mut cache = att.cache(&cfg, &dev, n).unwrap();
        let f32s = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let kt = Tensor::from_vec(f32s(&k), (1, n, kv, d), &dev).unwrap();
        let vt = Tensor::from_vec(f32s(&v), (1, n, kv, d), &dev).unwrap();
        if past > 0 {
            let q0 = Tensor::zeros((1, past, heads, d), DType::F32, &dev).unwrap();
            att.forward(
                0,
                &q0,
                &kt.narrow(1, 0, past).unwrap(),
                &vt.narrow(1, 0, past).unwrap(),
                &mut cache,
            )
            .unwrap();
            cache.advance(past);
        }
        let qt = Tensor::from_vec(f32s(&q), (1, t, heads, d), &dev).unwrap();
        let out = att
            .forward(
                0,
                &qt,
                &kt.narrow(1, past, t).unwrap(),
                &vt.narrow(1, past, t).unwrap(),
                &mut cache,
            )
            .unwrap();
        assert_eq!(out.dims(), &[1, t, heads, d]);
        let shape = RefShape {
            batch: 1,
            seqlen_q: t,
            seqlen_k: n,
            heads_q: heads,
            heads_kv: kv,
            head_dim: d,
        };
        let want = rope_attention_f64(&shape, &q, &k, &v, &rope, 1.0 / (d as f64).sqrt()).unwrap();
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = got
            .iter()
            .zip(&want.out)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 2e-5, "{scaling:?}, {past} + {t}: max error {err}");
    }
}

#[test]
fn attention_rejects_what_it_cannot_run() {
    let dev = Device::Cpu;
    let config = RopeConfig {
        base: 100000.0,
        rotary_dim: 64,
        layout: RopeLayout::Interleaved,
        scaling: RopeScaling::None,
    };
    let rerope = RopeOptions::new(config, PositionMode::ReRope { window: 16 });
    assert!(Attention::new(Backend::Candle, DType::F32, rerope, 64).is_err());
    let plain = RopeOptions::new(config, PositionMode::Rope);
    assert!(Attention::new(Backend::Longflash, DType::F32, plain.clone(), 64).is_err());
    let lf = Attention::new(Backend::Longflash, DType::F16, plain.clone(), 64).unwrap();
    let cfg = model::Config {
        layers: 1,
        hidden: 128,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        ffn: 1,
        eps: 1e-5,
        rope_base: 1e5,
        rotary_dim: 64,
        context_length: 8,
        vocab: 1,
    };
    assert!(lf.cache(&cfg, &dev, 8).is_err(), "longflash on the CPU");
    let att = Attention::new(Backend::Candle, DType::F32, plain, 64).unwrap();
    let mut cache = att.cache(&cfg, &dev, 8).unwrap();
    let z = |s: (usize, usize, usize, usize)| Tensor::zeros(s, DType::F32, &dev).unwrap();
    // Batch 2, a k of another length, three query heads over one... two KV heads, a layer the
    // cache lacks, more tokens than it holds.
    assert!(att
        .forward(
            0,
            &z((2, 3, 2, 64)),
            &z((2, 3, 1, 64)),
            &z((2, 3, 1, 64)),
            &mut cache
        )
        .is_err());
    assert!(att
        .forward(
            0,
            &z((1, 3, 2, 64)),
            &z((1, 4, 1, 64)),
            &z((1, 4, 1, 64)),
            &mut cache
        )
        .is_err());
    assert!(att
        .forward(
            0,
            &z((1, 3, 3, 64)),
            &z((1, 3, 2, 64)),
            &z((1, 3, 2, 64)),
            &mut cache
        )
        .is_err());
    assert!(att
        .forward(
            1,
            &z((1, 3, 2, 64)),
            &z((1, 3, 1, 64)),
            &z((1, 3, 1, 64)),
            &mut cache
        )
        .is_err());
    assert!(att
        .forward(
            0,
            &z((1, 9, 2, 64)),
            &z((1, 9, 1, 64)),
            &z((1, 9, 1, 64)),
            &mut cache
        )
        .is_err());
    let ok = att.forward(
        0,
        &z((1, 3, 2, 64)),
        &z((1, 3, 1, 64)),
        &z((1, 3, 1, 64)),
        &mut cache,
    );
    assert_eq!(ok.unwrap().dims(), &[1, 3, 2, 64]);
}

#[test]
fn the_model_loads_and_scales() {
    // A YaRN-scaled model loads and runs; its logits differ from the unscaled one's past the
    // first position (position 0 is not rotated).
    let plain = tiny_model(RopeScaling::None);
    let yarn = tiny_model(RopeScaling::Yarn {
        factor: 4.0,
        original_max_position: 256,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: Some(1.0),
    });
    let tokens = [5u32, 9, 11, 2, 40, 33, 7, 1];
    let run = |m: &Model| {
        let mut c = m.cache(tokens.len()).unwrap();
        m.forward(&tokens, &mut c, Logits::All).unwrap()
    };
    let (a, b) = (run(&plain), run(&yarn));
    assert!(max_diff(&a.narrow(0, 0, 1).unwrap(), &b.narrow(0, 0, 1).unwrap()) < 1e-5);
    assert!(max_diff(&a.narrow(0, 7, 1).unwrap(), &b.narrow(0, 7, 1).unwrap()) > 1e-4);
}
