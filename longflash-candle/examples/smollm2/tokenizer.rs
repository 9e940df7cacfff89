//! SmolLM2's tokenizer, rebuilt from the GGUF metadata: GPT-2 byte-level BPE over the vocabulary
//! (`tokenizer.ggml.tokens`) and merge list (`tokenizer.ggml.merges`).
//!
//! Encoding, as the model's own tokenizer does it (`tokenizer.ggml.pre = "smollm"`):
//!
//! 1. Special tokens (token types 3 "control" and 4 "user defined", e.g. `<|im_start|>`) are
//!    matched literally in the text and become their ids.
//! 2. The rest is pre-tokenized by a sequence of two splits: every numeric character alone
//!    (`Digits(individual_digits = true)`), then the GPT-2 pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` on each piece.
//!    The `regex` crate has no look-ahead, so `\s+(?!\S)` is done by hand: a whitespace run
//!    followed by a non-space character gives back its last character to the next word.
//! 3. Each word's UTF-8 bytes are mapped to the printable characters of GPT-2's byte alphabet,
//!    then merged pair by pair, lowest merge rank first.
//!
//! Decoding maps the characters of the tokens back to bytes (special tokens stay as written).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{bail, Result};
use regex::Regex;

/// GGUF token types that are matched literally in the input (control, user-defined).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others
/// are shifted to code points from 256 on, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let keep = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if keep {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("code points 256..=323 are characters")
        };
    }
    table
}

/// A byte-level BPE tokenizer.
pub struct Tokenizer {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// `(left, right) -> (rank, merged)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest first.
    specials: Vec<(String, u32)>,
    special_ids: Vec<bool>,
    to_char: [char; 256],
    to_byte: HashMap<char, u8>,
    split: Regex,
    /// Beginning and end of sequence ids.
    pub bos: Option<u32>,
    /// End of sequence id.
    pub eos: Option<u32>,
}

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v),
        None => bail!("the GGUF file has no `{key}` (not a tokenizer this program reads)"),
    }
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    v.to_vec()?
        .iter()
        .map(|s| match s {
            Value::String(s) => Ok(s.clone()),
            other => bail!("`{key}` holds a non-string {other:?}"),
        })
        .collect()
}

fn optional_id(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl Tokenizer {
    /// Reads the tokenizer from the GGUF metadata.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = meta(ct, "tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!("tokenizer.ggml.model is `{model}`; only GPT-2 byte-level BPE is supported");
        }
        if let Some(pre) = ct.metadata.get("tokenizer.ggml.pre") {
            let pre = pre.to_string()?;
            if pre != "smollm" {
                eprintln!(
                    "warning: tokenizer.ggml.pre is `{pre}`; splitting as SmolLM's (digits, then GPT-2)"
                );
            }
        }
        let tokens = strings(meta(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let merges = strings(meta(ct, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let mut tok = Self::new(tokens, &merges, &types)?;
        tok.bos = optional_id(ct, "tokenizer.ggml.bos_token_id");
        tok.eos = optional_id(ct, "tokenizer.ggml.eos_token_id");
        Ok(tok)
    }

    /// A tokenizer from its vocabulary, merges (`"left right"`) and GGUF token types.
    pub fn new(tokens: Vec<String>, merges: &[String], types: &[i32]) -> Result<Self> {
        if types.len() != tokens.len() {
            bail!("{} token types for {} tokens", types.len(), tokens.len());
        }
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merge_table = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                bail!("merge {rank} `{m}` is not two tokens");
            };
            let (Some(&ia), Some(&ib), Some(&ab)) =
                (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
            else {
                bail!("merge {rank} `{m}` names a token outside the vocabulary");
            };
            merge_table.entry((ia, ib)).or_insert((rank as u32, ab));
        }
        let special_ids: Vec<bool> = types
            .iter()
            .map(|&t| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
            .collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| special_ids[i] && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let to_char = byte_alphabet();
        let to_byte = to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let split = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
            .map_err(candle_core::Error::wrap)?;
        Ok(Tokenizer {
            tokens,
            ids,
            merges: merge_table,
            specials,
            special_ids,
            to_char,
            to_byte,
            split,
            bos: None,
            eos: None,
        })
    }

    /// Vocabulary size.
    #[allow(dead_code)] // for the tests
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token string, if it is one.
    #[allow(dead_code)] // for the tests
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Encodes `text`, special tokens included (no BOS is added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token in what is left (the longest at that place).
            let mut next: Option<(usize, usize, u32)> = None;
            for (s, id) in &self.specials {
                if let Some(at) = rest.find(s.as_str()) {
                    if next.is_none_or(|(n, len, _)| at < n || (at == n && s.len() > len)) {
                        next = Some((at, s.len(), *id));
                    }
                }
            }
            let (plain, special) = match next {
                Some((at, len, id)) => (&rest[..at], Some((at + len, id))),
                None => (rest, None),
            };
            for word in self.pre_tokenize(plain) {
                if let Some(ids) = cache.get(word) {
                    out.extend_from_slice(ids);
                } else {
                    let ids = self.bpe(word);
                    out.extend_from_slice(&ids);
                    cache.insert(word, ids);
                }
            }
            match special {
                Some((end, id)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    /// The words of `text`: digits one by one, then the GPT-2 split within each piece.
    pub fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut words = Vec::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_piece(&text[start..i], &mut words);
                words.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        self.split_piece(&text[start..], &mut words);
        words
    }

    fn split_piece<'t>(&self, piece: &'t str, words: &mut Vec<&'t str>) {
        let mut at = 0;
        while at < piece.len() {
            let Some(m) = self.split.find_at(piece, at) else {
                // Every character matches some branch; keep the rest whole all the same.
                words.push(&piece[at..]);
                return;
            };
            // Anything skipped (cannot happen: one branch matches each character) stays a word.
            if m.start() > at {
                words.push(&piece[at..m.start()]);
            }
            let mut end = m.end();
            let word = m.as_str();
            // `\s+(?!\S)`: a whitespace run followed by more text leaves its last character to
            // the next word, unless it is a single character.
            if end < piece.len() && word.chars().all(char::is_whitespace) {
                let last = word.chars().next_back().map_or(0, char::len_utf8);
                if word.len() > last {
                    end -= last;
                }
            }
            words.push(&piece[m.start()..end]);
            at = end;
        }
    }

    /// Byte-level BPE of one word.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let mut parts: Vec<u32> = Vec::with_capacity(word.len());
        let mut buf = [0u8; 4];
        for &b in word.as_bytes() {
            let s = self.to_char[b as usize].encode_utf8(&mut buf);
            // Every byte character is in a byte-level vocabulary; 0 stands in otherwise.
            parts.push(self.ids.get(&*s).copied().unwrap_or(0));
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((rank, _, _)) = best else { break };
            // Merge every occurrence of the best pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() {
                    if let Some(&(r, m)) = self.merges.get(&(parts[i], parts[i + 1])) {
                        if r == rank {
                            merged.push(m);
                            i += 2;
                            continue;
                        }
                    }
                }
                merged.push(parts[i]);
                i += 1;
            }
            parts = merged;
        }
        parts
    }

    /// The bytes `ids` stand for (special tokens as their text; ids outside the vocabulary are
    /// skipped).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.special_ids[id as usize] {
                out.extend_from_slice(t.as_bytes());
                continue;
            }
            for c in t.chars() {
                match self.to_byte.get(&c) {
                    Some(&b) => out.push(b),
                    None => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
        }
        out
    }

    /// The text `ids` stand for (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.get(id as usize).copied().unwrap_or(false)
    }
}
