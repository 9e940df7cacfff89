//! The command line: sub-commands, position modes, attention back end. Hand-written so that the
//! example adds no argument-parsing dependency; every mistake is an [`ArgError`] with a message,
//! never a panic.

use std::fmt;
use std::path::PathBuf;

/// What went wrong on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ArgError> {
    Err(ArgError(msg.into()))
}

pub const USAGE: &str = "\
smollm2: SmolLM2-135M (GGUF) on candle, attention on longflash or on candle's own ops

usage: smollm2 <command> [options]

commands:
  generate  --prompt TEXT | --prompt-file FILE [--max-new N] [--chat] [--prompt-tokens N]
            greedy generation; prints the text, prefill and decoding tokens/s
  ppl       FILE [--max-tokens N] [--segment N] [--json OUT]
            mean NLL per position bucket (0-1k, 1k-2k, 2k-4k, 4k-8k, 8k-12k, 12k-16k,
            16k-24k, 24k-32k, then doubling) of the text in FILE; with --segment, the text
            scored in independent segments of N tokens (the same tokens with less context)
  passkey   [--lengths 8k,16k,32k] [--depths 0.1,0.3,0.5,0.7,0.9] [--seed N] [--json OUT]
            the pass key hidden in filler text; retrieved or not for each length and depth
  compare   --prompt-file FILE [--prompt-tokens 1024] [--max-new 64]
            longflash against candle's attention in this program: last-row logits of the
            prompt, greedy tokens (needs a CUDA device)

options of every command:
  --model PATH       the GGUF file (default: $SMOLLM2_GGUF, else the file in $SMOLLM2_CACHE
                     or .cache/smollm2/ that scripts/fetch-smollm2.sh writes)
  --device D         cpu, cuda or cuda:N (default: cuda when built with the `cuda` feature)
  --attn A           longflash (default on CUDA) or candle (matmul + softmax; plain RoPE and
                     frequency scalings only; runs on the CPU too)
  --dtype T          f16, bf16 or f32 for q, k, v and the KV cache (f32: candle only;
                     default f16 on CUDA, f32 on the CPU)
  --chunk N          prefill chunk in tokens (default 2048)
  --quiet            no progress on stderr
  --check-attn N     checks longflash's attention in layers 0, 1 and the last: the last N
                     query rows of every call against longflash's f64 reference on the CPU
                     (a diagnostic; slow on long contexts)
position modes (one of the first three, at most one of the last two):
  --rope             plain RoPE (the default)
  --rerope W         ReRoPE: relative positions clamped at the window W
  --leaky W K        Leaky ReRoPE: beyond the window W, positions grow K times slower
  --ntk F            static NTK-aware scaling of the RoPE base by the factor F
  --yarn F           YaRN scaling by the factor F (original context from the GGUF)
  --log-n L          log-n query scaling: the query at position i times max(1, ln(i+1)/ln L),
                     L usually the trained length (8192); any mode above, longflash only
  --layers A-B M     layers A to B (0-based, or one layer A) use the position mode M instead:
                     rope, rerope:W or leaky:W:K, each optionally followed by :log-n:L (else no
                     log-n scaling there); repeatable for disjoint ranges, longflash only; the
                     scaling (--ntk, --yarn) stays the model's
";

/// Where attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attn {
    /// longflash's RoPE-fused forward (CUDA only).
    Longflash,
    /// candle's matmul + softmax with a causal mask.
    Candle,
}

/// The device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

/// Element type of q, k, v and the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F16,
    Bf16,
    F32,
}

/// How positions enter the scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModeArg {
    Rope,
    ReRope { window: u32 },
    Leaky { window: u32, leak: f64 },
}

/// Frequency scaling of the rotary table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScalingArg {
    None,
    Ntk(f64),
    Yarn(f64),
}

/// Options every command takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    pub model: Option<PathBuf>,
    pub device: DeviceArg,
    pub attn: Attn,
    pub dtype: DTypeArg,
    pub chunk: usize,
    pub mode: ModeArg,
    pub scaling: ScalingArg,
    pub quiet: bool,
    /// Query rows per attention call to check against the f64 reference (0: no check).
    pub check_attn: usize,
    /// Log-n query scaling's trained length (`--log-n`), or none.
    pub log_n: Option<usize>,
    /// Layers with their own position mode and log-n length (`--layers`), disjoint ranges.
    pub layer_modes: Vec<LayerMode>,
}

/// `--layers A-B M`: layers `first..=last` use `mode` and `log_n` instead of the command's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerMode {
    pub first: usize,
    pub last: usize,
    pub mode: ModeArg,
    pub log_n: Option<usize>,
}

/// Parses `--layers`' range (`A-B` or `A`) and mode (`rope`, `rerope:W`, `leaky:W:K`, each with
/// an optional `:log-n:L`).
pub fn parse_layer_mode(range: &str, spec: &str) -> Result<LayerMode, ArgError> {
    let bound = |x: &str| -> Result<usize, ArgError> {
        x.trim().parse::<usize>().or_else(|_| {
            err(format!(
                "--layers: `{range}` is not a layer range (A-B or A, 0-based)"
            ))
        })
    };
    let (first, last) = match range.split_once('-') {
        Some((a, b)) => (bound(a)?, bound(b)?),
        None => (bound(range)?, bound(range)?),
    };
    if first > last {
        return err(format!("--layers: `{range}` is an empty range"));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (mode, rest) = match parts.as_slice() {
        ["rope", rest @ ..] => (ModeArg::Rope, rest),
        ["rerope", w, rest @ ..] => (
            ModeArg::ReRope {
                window: parse_window("--layers", w)?,
            },
            rest,
        ),
        ["leaky", w, k, rest @ ..] => {
            let leak = parse_f64("--layers", k)?;
            if leak <= 1.0 {
                return err(format!("--layers: the leak K must be above 1 (got {k})"));
            }
            (
                ModeArg::Leaky {
                    window: parse_window("--layers", w)?,
                    leak,
                },
                rest,
            )
        }
        _ => {
            return err(format!(
                "--layers: `{spec}` is not rope, rerope:W or leaky:W:K (with an optional \
                 :log-n:L)"
            ))
        }
    };
    let log_n = match rest {
        [] => None,
        ["log-n", l] => {
            let l = parse_count("--layers", l)?;
            if l < 2 {
                return err("--layers: the log-n length is at least 2 (ln L > 0)");
            }
            Some(l)
        }
        _ => {
            return err(format!(
                "--layers: `{spec}` ends in something other than :log-n:L"
            ))
        }
    };
    Ok(LayerMode {
        first,
        last,
        mode,
        log_n,
    })
}

/// Where a prompt comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generate {
    pub prompt: Prompt,
    pub max_new: usize,
    pub chat: bool,
    /// Keep only the first N tokens of the prompt.
    pub prompt_tokens: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ppl {
    pub file: PathBuf,
    pub max_tokens: usize,
    /// Score the text in independent segments of this many tokens (each from an empty cache,
    /// positions from 0): the NLL the same tokens get with at most that much context.
    pub segment: Option<usize>,
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Passkey {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub seed: u64,
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Compare {
    pub file: PathBuf,
    pub prompt_tokens: usize,
    pub max_new: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Generate(Common, Generate),
    Ppl(Common, Ppl),
    Passkey(Common, Passkey),
    Compare(Common, Compare),
}

/// A token count: digits with an optional `k` (x1024) or `m` (x1024^2) suffix.
pub fn parse_count(flag: &str, s: &str) -> Result<usize, ArgError> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024usize),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    match digits.parse::<usize>() {
        Ok(n) => match n.checked_mul(mult) {
            Some(v) => Ok(v),
            None => err(format!("{flag}: `{s}` is too large")),
        },
        Err(_) => err(format!(
            "{flag}: `{s}` is not a count (digits with an optional k or m suffix)"
        )),
    }
}

fn parse_f64(flag: &str, s: &str) -> Result<f64, ArgError> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => err(format!("{flag}: `{s}` is not a finite number")),
    }
}

fn parse_window(flag: &str, s: &str) -> Result<u32, ArgError> {
    let n = parse_count(flag, s)?;
    match u32::try_from(n) {
        Ok(w) if w >= 1 => Ok(w),
        _ => err(format!(
            "{flag}: the window must be between 1 and {}",
            u32::MAX
        )),
    }
}

fn parse_factor(flag: &str, s: &str) -> Result<f64, ArgError> {
    let f = parse_f64(flag, s)?;
    if f < 1.0 {
        return err(format!("{flag}: the factor must be at least 1 (got {s})"));
    }
    Ok(f)
}

/// The arguments after the program name.
struct Cursor {
    args: Vec<String>,
    at: usize,
}

impl Cursor {
    fn next(&mut self) -> Option<String> {
        let a = self.args.get(self.at).cloned();
        self.at += 1;
        a
    }

    fn value(&mut self, flag: &str) -> Result<String, ArgError> {
        match self.next() {
            Some(v) => Ok(v),
            None => err(format!("{flag} needs a value")),
        }
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, ArgError> {
    let mut cur = Cursor {
        args: args.to_vec(),
        at: 0,
    };
    let Some(cmd) = cur.next() else {
        return err("no command given (generate, ppl, passkey or compare); try --help");
    };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        return Ok(Command::Help);
    }
    if !matches!(cmd.as_str(), "generate" | "ppl" | "passkey" | "compare") {
        return err(format!(
            "unknown command `{cmd}` (generate, ppl, passkey or compare); try --help"
        ));
    }

    let mut model = None;
    let mut device = None;
    let mut attn = None;
    let mut dtype = None;
    let mut chunk = 2048usize;
    let mut mode: Option<(ModeArg, &'static str)> = None;
    let mut scaling: Option<(ScalingArg, &'static str)> = None;
    let mut quiet = false;
    let mut check_attn = 0usize;
    let mut log_n: Option<usize> = None;
    let mut layer_modes: Vec<LayerMode> = Vec::new();

    let mut prompt: Option<Prompt> = None;
    let mut max_new: Option<usize> = None;
    let mut chat = false;
    let mut prompt_tokens: Option<usize> = None;
    let mut file: Option<PathBuf> = None;
    let mut max_tokens = 32 * 1024;
    let mut segment = None;
    let mut json = None;
    let mut lengths = vec![8 * 1024, 16 * 1024, 32 * 1024];
    let mut depths = vec![0.1, 0.3, 0.5, 0.7, 0.9];
    let mut seed = 1u64;

    let set_mode =
        |mode: &mut Option<(ModeArg, &'static str)>, m: ModeArg, flag: &'static str| match mode {
            Some((_, prev)) => err(format!(
                "{flag}: a position mode was already given ({prev})"
            )),
            None => {
                *mode = Some((m, flag));
                Ok(())
            }
        };
    let only = |cmds: &[&str], flag: &str| -> Result<(), ArgError> {
        if cmds.contains(&cmd.as_str()) {
            Ok(())
        } else {
            err(format!("{flag} is not an option of `{cmd}`"))
        }
    };

    while let Some(a) = cur.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--model" => model = Some(PathBuf::from(cur.value(&a)?)),
            "--device" => {
                let v = cur.value(&a)?;
                device = Some(match v.as_str() {
                    "cpu" => DeviceArg::Cpu,
                    "cuda" | "gpu" => DeviceArg::Cuda(0),
                    other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                        Some(Ok(n)) => DeviceArg::Cuda(n),
                        _ => return err(format!("--device: `{v}` is not cpu, cuda or cuda:N")),
                    },
                })
            }
            "--attn" => {
                let v = cur.value(&a)?;
                attn = Some(match v.as_str() {
                    "longflash" => Attn::Longflash,
                    "candle" => Attn::Candle,
                    _ => return err(format!("--attn: `{v}` is not longflash or candle")),
                })
            }
            "--dtype" => {
                let v = cur.value(&a)?;
                dtype = Some(match v.as_str() {
                    "f16" => DTypeArg::F16,
                    "bf16" => DTypeArg::Bf16,
                    "f32" => DTypeArg::F32,
                    _ => return err(format!("--dtype: `{v}` is not f16, bf16 or f32")),
                })
            }
            "--chunk" => {
                chunk = parse_count("--chunk", &cur.value(&a)?)?;
                if chunk == 0 {
                    return err("--chunk: a chunk holds at least one token");
                }
            }
            "--quiet" | "-q" => quiet = true,
            "--check-attn" => check_attn = parse_count("--check-attn", &cur.value(&a)?)?,
            "--log-n" => {
                let l = parse_count("--log-n", &cur.value(&a)?)?;
                if l < 2 {
                    return err("--log-n: the trained length is at least 2 (ln L > 0)");
                }
                log_n = Some(l);
            }
            "--layers" => {
                let range = cur.value(&a)?;
                let spec = cur.value("--layers (its mode)")?;
                let m = parse_layer_mode(&range, &spec)?;
                if let Some(o) = layer_modes
                    .iter()
                    .find(|o| o.first <= m.last && m.first <= o.last)
                {
                    return err(format!(
                        "--layers: {range} overlaps layers {}-{} given before",
                        o.first, o.last
                    ));
                }
                layer_modes.push(m);
            }
            "--rope" => set_mode(&mut mode, ModeArg::Rope, "--rope")?,
            "--rerope" => {
                let window = parse_window("--rerope", &cur.value(&a)?)?;
                set_mode(&mut mode, ModeArg::ReRope { window }, "--rerope")?
            }
            "--leaky" => {
                let window = parse_window("--leaky", &cur.value(&a)?)?;
                let k = cur.value("--leaky (its leak K)")?;
                let leak = parse_f64("--leaky", &k)?;
                if leak <= 1.0 {
                    return err(format!("--leaky: the leak K must be above 1 (got {k})"));
                }
                set_mode(&mut mode, ModeArg::Leaky { window, leak }, "--leaky")?
            }
            "--ntk" | "--yarn" => {
                let f = parse_factor(&a, &cur.value(&a)?)?;
                let (s, flag) = if a == "--ntk" {
                    (ScalingArg::Ntk(f), "--ntk")
                } else {
                    (ScalingArg::Yarn(f), "--yarn")
                };
                if let Some((_, prev)) = scaling {
                    return err(format!("{flag}: a scaling was already given ({prev})"));
                }
                scaling = Some((s, flag));
            }
            "--prompt" => {
                only(&["generate"], &a)?;
                if prompt.is_some() {
                    return err("--prompt: a prompt was already given");
                }
                prompt = Some(Prompt::Text(cur.value(&a)?));
            }
            "--prompt-file" => {
                only(&["generate", "compare"], &a)?;
                if prompt.is_some() {
                    return err("--prompt-file: a prompt was already given");
                }
                prompt = Some(Prompt::File(PathBuf::from(cur.value(&a)?)));
            }
            "--max-new" => {
                only(&["generate", "compare"], &a)?;
                max_new = Some(parse_count(&a, &cur.value(&a)?)?);
            }
            "--chat" => {
                only(&["generate"], &a)?;
                chat = true;
            }
            "--prompt-tokens" => {
                only(&["generate", "compare"], &a)?;
                let n = parse_count(&a, &cur.value(&a)?)?;
                if n == 0 {
                    return err("--prompt-tokens: keep at least one token");
                }
                prompt_tokens = Some(n);
            }
            "--max-tokens" => {
                only(&["ppl"], &a)?;
                max_tokens = parse_count(&a, &cur.value(&a)?)?;
                if max_tokens < 2 {
                    return err("--max-tokens: at least 2 tokens (one prediction)");
                }
            }
            "--segment" => {
                only(&["ppl"], &a)?;
                let n = parse_count(&a, &cur.value(&a)?)?;
                if n < 2 {
                    return err("--segment: at least 2 tokens (one prediction)");
                }
                segment = Some(n);
            }
            "--json" => {
                only(&["ppl", "passkey"], &a)?;
                json = Some(PathBuf::from(cur.value(&a)?));
            }
            "--lengths" => {
                only(&["passkey"], &a)?;
                lengths = cur
                    .value(&a)?
                    .split(',')
                    .map(|s| parse_count("--lengths", s))
                    .collect::<Result<_, _>>()?;
                if lengths.iter().any(|&n| n < 256) {
                    return err("--lengths: each prompt length must be at least 256 tokens");
                }
            }
            "--depths" => {
                only(&["passkey"], &a)?;
                depths = cur
                    .value(&a)?
                    .split(',')
                    .map(|s| parse_f64("--depths", s))
                    .collect::<Result<_, _>>()?;
                if depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
                    return err("--depths: each depth is a fraction between 0 and 1");
                }
            }
            "--seed" => {
                only(&["passkey"], &a)?;
                let v = cur.value(&a)?;
                seed = match v.parse() {
                    Ok(s) => s,
                    Err(_) => return err(format!("--seed: `{v}` is not an unsigned integer")),
                };
            }
            other if other.starts_with('-') && other.len() > 1 => {
                return err(format!("unknown option `{other}`; try --help"))
            }
            _ => {
                if matches!(cmd.as_str(), "ppl") && file.is_none() {
                    file = Some(PathBuf::from(a));
                } else {
                    return err(format!("unexpected argument `{a}`; try --help"));
                }
            }
        }
    }

    let device = device.unwrap_or(if cfg!(feature = "cuda") {
        DeviceArg::Cuda(0)
    } else {
        DeviceArg::Cpu
    });
    let attn = attn.unwrap_or(match device {
        DeviceArg::Cpu => Attn::Candle,
        DeviceArg::Cuda(_) => Attn::Longflash,
    });
    let dtype = dtype.unwrap_or(match device {
        DeviceArg::Cpu => DTypeArg::F32,
        DeviceArg::Cuda(_) => DTypeArg::F16,
    });
    let mode = mode.map_or(ModeArg::Rope, |m| m.0);
    let scaling = scaling.map_or(ScalingArg::None, |s| s.0);
    let common = Common {
        model,
        device,
        attn,
        dtype,
        chunk,
        mode,
        scaling,
        quiet,
        check_attn,
        log_n,
        layer_modes,
    };
    check_common(&common)?;

    Ok(match cmd.as_str() {
        "generate" => {
            let Some(prompt) = prompt else {
                return err("generate needs --prompt TEXT or --prompt-file FILE");
            };
            Command::Generate(
                common,
                Generate {
                    prompt,
                    max_new: max_new.unwrap_or(64),
                    chat,
                    prompt_tokens,
                },
            )
        }
        "ppl" => {
            let Some(file) = file else {
                return err("ppl needs the text FILE to score");
            };
            Command::Ppl(
                common,
                Ppl {
                    file,
                    max_tokens,
                    segment,
                    json,
                },
            )
        }
        "passkey" => Command::Passkey(
            common,
            Passkey {
                lengths,
                depths,
                seed,
                json,
            },
        ),
        _ => {
            let Some(Prompt::File(file)) = prompt else {
                return err("compare needs --prompt-file FILE");
            };
            Command::Compare(
                common,
                Compare {
                    file,
                    prompt_tokens: prompt_tokens.unwrap_or(1024),
                    max_new: max_new.unwrap_or(64),
                },
            )
        }
    })
}

/// Combinations that cannot run, found before anything is loaded.
fn check_common(c: &Common) -> Result<(), ArgError> {
    match c.attn {
        Attn::Longflash => {
            if !cfg!(feature = "cuda") {
                return err(
                    "--attn longflash needs the `cuda` feature of longflash-candle (built \
                     without it); use --attn candle, or build with default features on a CUDA \
                     machine",
                );
            }
            if c.device == DeviceArg::Cpu {
                return err("--attn longflash runs on CUDA devices only; use --device cuda or --attn candle");
            }
            if c.dtype == DTypeArg::F32 {
                return err("--dtype f32: longflash takes f16 or bf16");
            }
        }
        Attn::Candle => {
            if c.check_attn > 0 {
                return err("--check-attn checks longflash's attention: it needs --attn longflash");
            }
            if c.log_n.is_some() {
                return err(
                    "--log-n scales queries inside longflash's kernels: it needs --attn longflash",
                );
            }
            if !c.layer_modes.is_empty() {
                return err("--layers sets position modes of longflash's kernels: it needs --attn longflash");
            }
            if c.mode != ModeArg::Rope {
                return err(
                    "--attn candle computes plain RoPE only (with --ntk or --yarn scalings); \
                     ReRoPE and Leaky ReRoPE run with --attn longflash",
                );
            }
        }
    }
    if matches!(c.device, DeviceArg::Cuda(_)) && !cfg!(feature = "cuda") {
        return err("--device cuda: this build has no CUDA (built without the `cuda` feature); use --device cpu");
    }
    Ok(())
}
