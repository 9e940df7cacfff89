//! The sub-commands: loading, `generate`, `ppl`, `passkey`, `compare`; a progress line on
//! stderr; results as text on stdout and, on request, as JSON.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::Content;
use candle_core::{bail, DType, Device, Result, Tensor, D};
use longflash_candle::{PositionMode, RopeOptions, RopeScaling};

use crate::args::{
    self, Attn, Common, DTypeArg, DeviceArg, LayerMode, ModeArg, Prompt, ScalingArg,
};
use crate::attention::{Attention, Backend};
use crate::model::{Config, Logits, Model};
use crate::tokenizer::Tokenizer;

/// The model file: `--model`, else `$SMOLLM2_GGUF`, else the first `.gguf` in `$SMOLLM2_CACHE`
/// or the repository's `.cache/smollm2/`.
pub fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("SMOLLM2_GGUF") {
        return Ok(PathBuf::from(p));
    }
    let dir = match std::env::var_os("SMOLLM2_CACHE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/smollm2"),
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.into_iter().next() {
        Some(p) => Ok(p),
        None => bail!(
            "no model: no .gguf in {} (run scripts/fetch-smollm2.sh, or pass --model PATH)",
            dir.display()
        ),
    }
}

/// The candle device of the command line.
pub fn device(d: DeviceArg) -> Result<Device> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda(n) => Device::new_cuda(n),
    }
}

pub fn dtype(d: DTypeArg) -> DType {
    match d {
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F32 => DType::F32,
    }
}

/// The position options of the command line for a model of `config`.
pub fn rope_options(c: &Common, config: &Config) -> RopeOptions {
    let scaling = match c.scaling {
        ScalingArg::None => RopeScaling::None,
        ScalingArg::Ntk(factor) => RopeScaling::NtkAware { factor },
        ScalingArg::Yarn(factor) => RopeScaling::Yarn {
            factor,
            original_max_position: config.context_length,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        },
    };
    let mut rope = RopeOptions::new(config.rope(scaling), position_mode(c.mode));
    rope.log_n_train_len = c.log_n;
    rope
}

fn position_mode(m: ModeArg) -> PositionMode {
    match m {
        ModeArg::Rope => PositionMode::Rope,
        ModeArg::ReRope { window } => PositionMode::ReRope { window },
        ModeArg::Leaky { window, leak } => PositionMode::LeakyReRope { window, leak },
    }
}

/// The position options of `--layers` entry `m`: the command's (its rotary table and scaling)
/// with `m`'s mode and log-n length.
pub fn layer_rope_options(c: &Common, config: &Config, m: &LayerMode) -> RopeOptions {
    let mut rope = RopeOptions {
        mode: position_mode(m.mode),
        ..rope_options(c, config)
    };
    rope.log_n_train_len = m.log_n;
    rope
}

fn mode_name(m: ModeArg) -> String {
    match m {
        ModeArg::Rope => "rope".to_string(),
        ModeArg::ReRope { window } => format!("rerope w={window}"),
        ModeArg::Leaky { window, leak } => format!("leaky w={window} k={leak}"),
    }
}

/// A name for the position settings, for reports.
pub fn mode_label(c: &Common) -> String {
    let mode = mode_name(c.mode);
    let mode = match c.scaling {
        ScalingArg::None => mode,
        ScalingArg::Ntk(f) => format!("{mode}, ntk x{f}"),
        ScalingArg::Yarn(f) => format!("{mode}, yarn x{f}"),
    };
    let mut label = match c.log_n {
        Some(l) => format!("{mode}, log-n {l}"),
        None => mode,
    };
    for m in &c.layer_modes {
        label += &format!("; layers {}-{}: {}", m.first, m.last, mode_name(m.mode));
        if let Some(l) = m.log_n {
            label += &format!(", log-n {l}");
        }
    }
    label
}

/// The attention back end and element type, for reports.
pub fn attn_label(c: &Common) -> String {
    format!("{:?} {:?}", c.attn, c.dtype).to_lowercase()
}

fn backend(a: Attn) -> Backend {
    match a {
        Attn::Longflash => Backend::Longflash,
        Attn::Candle => Backend::Candle,
    }
}

/// Loads the model and tokenizer as the command line says.
pub fn open(c: &Common) -> Result<(Model, Tokenizer)> {
    let path = model_path(c.model.as_deref())?;
    let dev = device(c.device)?;
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => bail!(
            "cannot open the model {}: {e} (scripts/fetch-smollm2.sh fetches it)",
            path.display()
        ),
    };
    let ct = Content::read(&mut file)
        .map_err(|e| e.context(format!("{} is not a GGUF file", path.display())))?;
    let config = Config::from_gguf(&ct)?;
    let attention = Attention::new(
        backend(c.attn),
        dtype(c.dtype),
        rope_options(c, &config),
        config.head_dim,
    )?
    .with_check(c.check_attn, vec![0, 1, config.layers.saturating_sub(1)]);
    let mut attention = attention;
    for m in &c.layer_modes {
        if m.last >= config.layers {
            bail!(
                "--layers {}-{}: the model has layers 0 to {}",
                m.first,
                m.last,
                config.layers - 1
            );
        }
        attention =
            attention.with_layer_rope(m.first, m.last, layer_rope_options(c, &config, m))?;
    }
    let model = Model::from_content(&ct, &mut file, &dev, attention)?;
    let tok = Tokenizer::from_gguf(&ct)?;
    if !c.quiet {
        let cfg = &model.config;
        eprintln!(
            "model {}: {} layers, hidden {}, {} heads over {} KV heads of {}, trained at {} \
             tokens; attention {:?} in {:?}, {}",
            path.display(),
            cfg.layers,
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.context_length,
            c.attn,
            c.dtype,
            mode_label(c)
        );
    }
    Ok((model, tok))
}

/// A progress line on stderr, redrawn at most twice a second (one line per tenth when stderr
/// is not a terminal).
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last: Instant,
    tty: bool,
    quiet: bool,
    tenths: usize,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: usize, quiet: bool) -> Self {
        let now = Instant::now();
        Progress {
            label: label.into(),
            total: total.max(1),
            start: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            quiet,
            tenths: 0,
        }
    }

    pub fn set(&mut self, done: usize) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let tenths = done * 10 / self.total;
        let due = if self.tty {
            now.duration_since(self.last).as_millis() >= 500 || done >= self.total
        } else {
            tenths > self.tenths
        };
        if !due {
            return;
        }
        self.last = now;
        self.tenths = tenths;
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let width = 30;
        let filled = (done.min(self.total) * width) / self.total;
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let line = format!(
            "{} [{bar}] {done}/{} ({:.0}%) {rate:.0} tok/s, eta {eta:.0} s",
            self.label,
            self.total,
            100.0 * done as f64 / self.total as f64
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&mut self) {
        if !self.quiet && self.tty {
            eprintln!();
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    match std::fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// SmolLM2-Instruct's chat template for one user turn (with its default system prompt).
pub fn chat_prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// The greedy choice of each row of `logits` `(rows, vocab)`.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}

/// Greedy decoding after a prefilled `cache` whose last logits are `logits`: up to `max_new`
/// tokens, stopping after a special token. `emit` sees each token as it comes.
fn decode_greedy(
    model: &Model,
    tok: &Tokenizer,
    cache: &mut crate::attention::KvCache,
    logits: &Tensor,
    max_new: usize,
    mut emit: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(max_new);
    let mut next = argmax_rows(logits)?[0];
    while out.len() < max_new {
        out.push(next);
        emit(next);
        if tok.is_special(next) || out.len() == max_new {
            break;
        }
        let logits = model.forward(&[next], cache, Logits::Last)?;
        next = argmax_rows(&logits)?[0];
    }
    Ok(out)
}

/// Writes the longest valid UTF-8 prefix of `pending` to stdout and keeps the rest.
fn flush_utf8(pending: &mut Vec<u8>) {
    let valid = match std::str::from_utf8(pending) {
        Ok(s) => s.len(),
        Err(e) if e.error_len().is_some() => pending.len(),
        Err(e) => e.valid_up_to(),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&pending[..valid]);
    let _ = out.flush();
    pending.drain(..valid);
}

pub fn generate(c: &Common, g: &args::Generate) -> Result<()> {
    let (model, tok) = open(c)?;
    let text = match &g.prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::File(p) => read_text(p)?,
    };
    let text = if g.chat { chat_prompt(&text) } else { text };
    let mut ids = tok.encode(&text);
    if let Some(n) = g.prompt_tokens {
        ids.truncate(n);
    }
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut cache = model.cache(ids.len() + g.max_new)?;
    let mut progress = Progress::new("prefill", ids.len(), c.quiet || ids.len() < 4096);
    let t0 = Instant::now();
    let mut last = None;
    model.prefill(&ids, &mut cache, c.chunk, Logits::Last, |done, l| {
        progress.set(done);
        last = Some(l.clone());
        Ok(())
    })?;
    let Some(logits) = last else {
        bail!("no logits after the prefill");
    };
    model.device().synchronize()?;
    progress.finish();
    let prefill_s = t0.elapsed().as_secs_f64();

    if ids.len() <= 2048 {
        print!("{}", tok.decode(&ids));
    } else {
        print!("[{} prompt tokens] ...", ids.len());
    }
    let mut pending = Vec::new();
    let t1 = Instant::now();
    let new = decode_greedy(&model, &tok, &mut cache, &logits, g.max_new, |id| {
        if !tok.is_special(id) {
            pending.extend(tok.decode_bytes(&[id]));
            flush_utf8(&mut pending);
        }
    })?;
    let decode_s = t1.elapsed().as_secs_f64();
    println!();
    // The first new token comes from the prefill's logits: decoding ran one step fewer.
    let steps = new.len().saturating_sub(1);
    println!(
        "prefill: {} tokens in {:.3} s ({:.1} tok/s); decoding: {} tokens in {:.3} s ({:.1} tok/s) at {} tokens of context",
        ids.len(),
        prefill_s,
        ids.len() as f64 / prefill_s,
        steps,
        decode_s,
        if decode_s > 0.0 { steps as f64 / decode_s } else { 0.0 },
        ids.len() + new.len()
    );
    Ok(())
}

/// Bucket edges in tokens: 0, 1k, 2k, 4k, 8k, 12k, 16k, 24k, 32k, then doubling past `n`.
pub fn bucket_edges(n: usize) -> Vec<usize> {
    let k = 1024;
    let mut edges = vec![0, k, 2 * k, 4 * k, 8 * k, 12 * k, 16 * k, 24 * k, 32 * k];
    while *edges.last().unwrap_or(&0) < n {
        let last = *edges.last().unwrap_or(&k);
        edges.push(last * 2);
    }
    let keep = edges
        .iter()
        .position(|&e| e >= n)
        .map_or(edges.len(), |i| i + 1);
    edges.truncate(keep.max(2));
    edges
}

fn kib(n: usize) -> String {
    if n % 1024 == 0 && n > 0 {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// Negative log-likelihood of `targets[i]` under row `i` of `logits` `(rows, vocab)`.
pub fn nll_rows(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let rows = targets.len();
    let logits = logits.narrow(0, 0, rows)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let idx = Tensor::new(targets, logits.device())?.reshape((rows, 1))?;
    let picked = logits.gather(&idx, 1)?;
    (lse - picked)?.squeeze(1)?.to_vec1::<f32>()
}

pub fn ppl(c: &Common, p: &args::Ppl) -> Result<()> {
    let (model, tok) = open(c)?;
    let mut ids = tok.encode(&read_text(&p.file)?);
    ids.truncate(p.max_tokens);
    let n = ids.len();
    if n < 2 {
        bail!("{} holds fewer than 2 tokens", p.file.display());
    }
    let edges = bucket_edges(n);
    let mut sums = vec![0f64; edges.len() - 1];
    let mut counts = vec![0usize; edges.len() - 1];
    // One segment (the whole text) or independent ones of `--segment` tokens; a token's bucket
    // is its position in the text either way.
    let seg_len = p.segment.unwrap_or(n).min(n);
    let mut cache = model.cache(seg_len)?;
    let mut progress = Progress::new("ppl", n, c.quiet);
    let t0 = Instant::now();
    for seg in (0..n).step_by(seg_len) {
        let seg_ids = &ids[seg..(seg + seg_len).min(n)];
        if seg > 0 {
            cache = model.cache(seg_len)?;
        }
        let mut start = 0;
        model.prefill(seg_ids, &mut cache, c.chunk, Logits::All, |done, logits| {
            // Row i of this chunk (position start + i) predicts the token at start + i + 1.
            let targets = &seg_ids[start + 1..(done + 1).min(seg_ids.len())];
            if !targets.is_empty() {
                let nll = nll_rows(logits, targets)?;
                for (i, v) in nll.iter().enumerate() {
                    let pos = seg + start + i + 1;
                    let b = edges.partition_point(|&e| e <= pos) - 1;
                    let b = b.min(sums.len() - 1);
                    sums[b] += f64::from(*v);
                    counts[b] += 1;
                }
            }
            start = done;
            progress.set(seg + done);
            Ok(())
        })?;
    }
    progress.finish();
    let secs = t0.elapsed().as_secs_f64();
    let total: f64 = sums.iter().sum();
    let count: usize = counts.iter().sum();
    println!(
        "ppl of {} ({n} tokens{}), {} attention, {}: mean NLL {:.4} over {count} predictions ({:.1} s, {:.0} tok/s)",
        p.file.display(),
        p.segment
            .map_or(String::new(), |s| format!(" in segments of {s}")),
        attn_label(c),
        mode_label(c),
        total / count as f64,
        secs,
        n as f64 / secs
    );
    println!("{:>14} {:>8} {:>9}", "positions", "tokens", "mean NLL");
    let mut json_buckets = Vec::new();
    for (b, (&s, &k)) in sums.iter().zip(&counts).enumerate() {
        if k == 0 {
            continue;
        }
        let label = format!("{}-{}", kib(edges[b]), kib(edges[b + 1]));
        println!("{label:>14} {k:>8} {:>9.4}", s / k as f64);
        json_buckets.push(format!(
            "{{\"lo\": {}, \"hi\": {}, \"count\": {k}, \"mean_nll\": {:.6}}}",
            edges[b],
            edges[b + 1],
            s / k as f64
        ));
    }
    if let Some(path) = &p.json {
        let json = format!(
            "{{\"task\": \"ppl\", \"file\": {}, \"tokens\": {n}, \"segment\": {}, \"attn\": \"{}\", \"mode\": {}, \"mean_nll\": {:.6}, \"buckets\": [{}]}}\n",
            json_str(&p.file.display().to_string()),
            p.segment.map_or("null".to_string(), |s| s.to_string()),
            attn_label(c),
            json_str(&mode_label(c)),
            total / count as f64,
            json_buckets.join(", ")
        );
        write_file(path, &json)?;
    }
    Ok(())
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", path.display())))
}

/// The passkey prompt's parts.
pub const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.";
pub const PASSKEY_FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
pub const PASSKEY_QUESTION: &str = " What is the pass key? The pass key is";

pub fn passkey_line(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// The passkey prompt with `repeats` fillers, the key after `round(depth * repeats)` of them.
pub fn passkey_text(key: u32, repeats: usize, depth: f64) -> String {
    let before = ((depth * repeats as f64).round() as usize).min(repeats);
    let mut s = String::with_capacity((repeats + 4) * PASSKEY_FILLER.len());
    s.push_str(PASSKEY_INTRO);
    for _ in 0..before {
        s.push_str(PASSKEY_FILLER);
    }
    s.push_str(&passkey_line(key));
    for _ in before..repeats {
        s.push_str(PASSKEY_FILLER);
    }
    s.push_str(PASSKEY_QUESTION);
    s
}

/// The passkey prompt's tokens, as long as fits in `length` tokens.
pub fn passkey_prompt(tok: &Tokenizer, key: u32, length: usize, depth: f64) -> Vec<u32> {
    let fixed = tok.encode(&passkey_text(key, 0, depth)).len();
    let per = tok.encode(PASSKEY_FILLER).len().max(1);
    let mut repeats = length.saturating_sub(fixed) / per;
    loop {
        let ids = tok.encode(&passkey_text(key, repeats, depth));
        if ids.len() <= length || repeats == 0 {
            return ids;
        }
        repeats -= 1;
    }
}

/// splitmix64: the keys of the passkey cases, reproducible from the seed.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn passkey(c: &Common, p: &args::Passkey) -> Result<()> {
    let (model, tok) = open(c)?;
    const NEW: usize = 8;
    let longest = p.lengths.iter().copied().max().unwrap_or(0);
    let mut cache = model.cache(longest + NEW)?;
    let mut rng = p.seed;
    let mut json_cases = Vec::new();
    println!("passkey, {} attention, {}", attn_label(c), mode_label(c));
    for &length in &p.lengths {
        let mut found = 0;
        for &depth in &p.depths {
            let key = 10_000 + (splitmix(&mut rng) % 90_000) as u32;
            let ids = passkey_prompt(&tok, key, length, depth);
            cache.clear();
            let mut progress = Progress::new(
                format!("passkey {} @ {depth:.2}", kib(length)),
                ids.len(),
                c.quiet || ids.len() < 4096,
            );
            let mut last = None;
            model.prefill(&ids, &mut cache, c.chunk, Logits::Last, |done, l| {
                progress.set(done);
                last = Some(l.clone());
                Ok(())
            })?;
            progress.finish();
            let Some(logits) = last else {
                bail!("no logits after the prefill");
            };
            let out = decode_greedy(&model, &tok, &mut cache, &logits, NEW, |_| {})?;
            let answer = tok.decode(&out);
            let retrieved = answer.contains(&key.to_string());
            found += usize::from(retrieved);
            println!(
                "length {:>6} ({} tokens) depth {depth:.2} key {key}: {:<12} {}",
                kib(length),
                ids.len(),
                format!("{:?}", answer.trim()),
                if retrieved {
                    "retrieved"
                } else {
                    "not retrieved"
                }
            );
            json_cases.push(format!(
                "{{\"length\": {length}, \"tokens\": {}, \"depth\": {depth}, \"key\": {key}, \"answer\": {}, \"retrieved\": {retrieved}}}",
                ids.len(),
                json_str(&answer)
            ));
        }
        println!(
            "length {:>6}: {found}/{} retrieved",
            kib(length),
            p.depths.len()
        );
    }
    if let Some(path) = &p.json {
        let json = format!(
            "{{\"task\": \"passkey\", \"attn\": \"{}\", \"mode\": {}, \"cases\": [{}]}}\n",
            attn_label(c),
            json_str(&mode_label(c)),
            json_cases.join(", ")
        );
        write_file(path, &json)?;
    }
    Ok(())
}

/// longflash against candle's attention (f32) in this program: the prompt's last logits and
/// the greedy continuation.
pub fn compare(c: &Common, p: &args::Compare) -> Result<()> {
    if !matches!(c.device, DeviceArg::Cuda(_)) || c.attn != Attn::Longflash {
        bail!("compare runs longflash against candle: it needs --device cuda and --attn longflash");
    }
    let (mut model, tok) = open(c)?;
    let mut ids = tok.encode(&read_text(&p.file)?);
    ids.truncate(p.prompt_tokens);
    if ids.is_empty() {
        bail!("{} encodes to no tokens", p.file.display());
    }
    let run = |model: &Model| -> Result<(Vec<f32>, Vec<u32>, f64)> {
        let mut cache = model.cache(ids.len() + p.max_new)?;
        let t0 = Instant::now();
        let mut last = None;
        model.prefill(&ids, &mut cache, c.chunk, Logits::Last, |_, l| {
            last = Some(l.clone());
            Ok(())
        })?;
        let Some(logits) = last else {
            bail!("no logits after the prefill");
        };
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let out = decode_greedy(model, &tok, &mut cache, &logits, p.max_new, |_| {})?;
        Ok((row, out, t0.elapsed().as_secs_f64()))
    };
    let (lf_logits, lf_tokens, lf_s) = run(&model)?;
    let peer = Attention::new(
        Backend::Candle,
        DType::F32,
        RopeOptions::new(model.attention().rope().config, PositionMode::Rope),
        model.config.head_dim,
    )?;
    if model.attention().rope().mode != PositionMode::Rope {
        bail!("compare checks plain RoPE (with or without a scaling): candle has no ReRoPE");
    }
    model.set_attention(peer)?;
    let (cd_logits, cd_tokens, cd_s) = run(&model)?;
    // candle's attention in longflash's element type: how far that rounding alone moves the
    // logits from the f32 ones, the yardstick for longflash's distance.
    let peer_lowp = Attention::new(
        Backend::Candle,
        dtype(c.dtype),
        RopeOptions::new(model.attention().rope().config, PositionMode::Rope),
        model.config.head_dim,
    )?;
    model.set_attention(peer_lowp)?;
    let (lp_logits, lp_tokens, _) = run(&model)?;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let max_abs = max_diff(&lf_logits, &cd_logits);
    let lowp_abs = max_diff(&lp_logits, &cd_logits);
    let lowp_first = lp_tokens.iter().zip(&cd_tokens).position(|(a, b)| a != b);
    let scale = cd_logits.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let same = lf_tokens == cd_tokens;
    let first_diff = lf_tokens.iter().zip(&cd_tokens).position(|(a, b)| a != b);
    println!(
        "prompt {} tokens; last-row logits: max |longflash - candle f32| = {max_abs:.4} (largest |logit| {scale:.2})",
        ids.len()
    );
    println!(
        "candle in {}: max |candle {} - candle f32| = {lowp_abs:.4}; greedy tokens {}",
        format!("{:?}", c.dtype).to_lowercase(),
        format!("{:?}", c.dtype).to_lowercase(),
        match lowp_first {
            None if lp_tokens == cd_tokens => "identical to candle f32's".to_string(),
            None => "a prefix of candle f32's (or the other way)".to_string(),
            Some(i) => format!("first differ from candle f32's at new token {i}"),
        }
    );
    println!(
        "greedy tokens: {} of longflash, {} of candle, {}",
        lf_tokens.len(),
        cd_tokens.len(),
        match (same, first_diff) {
            (true, _) => "identical".to_string(),
            (false, Some(i)) => format!("first difference at new token {i}"),
            (false, None) => "one is a prefix of the other".to_string(),
        }
    );
    println!("longflash: {:?}", tok.decode(&lf_tokens));
    println!("candle:    {:?}", tok.decode(&cd_tokens));
    println!("time (prefill + decoding): longflash {lf_s:.3} s, candle {cd_s:.3} s");
    Ok(())
}
