//! SmolLM2-135M-Instruct from its GGUF file on candle, with every attention call on longflash
//! (`--attn longflash`, CUDA) or on candle's own ops (`--attn candle`, any device).
//!
//! ```text
//! scripts/fetch-smollm2.sh        # the model, into .cache/smollm2/
//! cargo run -p longflash-candle --release --example smollm2 -- generate --prompt "..." --chat
//! cargo run -p longflash-candle --release --example smollm2 -- ppl book.txt --rerope 4096
//! cargo run -p longflash-candle --release --example smollm2 -- passkey --lengths 32k --rerope 4096
//! ```
//!
//! `smollm2 --help` lists the commands and options; longflash-candle/README-smollm2.md tells
//! how the checks run on a GPU machine.

#[path = "smollm2/args.rs"]
mod args;
#[path = "smollm2/attention.rs"]
mod attention;
#[path = "smollm2/model.rs"]
mod model;
#[path = "smollm2/tasks.rs"]
mod tasks;
#[path = "smollm2/tokenizer.rs"]
mod tokenizer;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let command = match args::parse(&argv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("smollm2: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &command {
        args::Command::Help => {
            print!("{}", args::USAGE);
            Ok(())
        }
        args::Command::Generate(c, g) => tasks::generate(c, g),
        args::Command::Ppl(c, p) => tasks::ppl(c, p),
        args::Command::Passkey(c, p) => tasks::passkey(c, p),
        args::Command::Compare(c, p) => tasks::compare(c, p),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smollm2: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error's text without the backtraces candle attaches when RUST_BACKTRACE is set.
fn message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", message(inner)),
        other => other.to_string(),
    }
}
