//! `distclip tokenize`: the contract is `{"tokens": [[int, ...], ...]}`, one row per text,
//! identical to `open_clip.tokenize(texts, context_length)`.

use distclip_tokenizer::{DEFAULT_CONTEXT_LENGTH, Tokenizer};

/// Arguments of `distclip tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Token positions per row (SOT + tokens + EOT, truncated keeping EOT, padded with 0).
    #[arg(long, default_value_t = DEFAULT_CONTEXT_LENGTH)]
    context_length: usize,
    /// Texts to tokenize.
    #[arg(required = true)]
    texts: Vec<String>,
}

/// Run the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.context_length >= 2, "--context-length must be at least 2 (SOT and EOT)");
    let rows = Tokenizer::shared().tokenize_batch(&args.texts, args.context_length);
    super::print_json(&serde_json::json!({ "tokens": rows }))
}
