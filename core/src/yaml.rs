//! Reading YAML that users write (pipelines, the webhook secrets file) with limits a
//! hostile file cannot get past: its size, its nesting, and how much its aliases may
//! expand. Both readers use these, so a file is refused quickly with a clear message
//! instead of exhausting the process.

use serde_saphyr::{budget::Budget, options::AliasLimits, Options};

/// Largest YAML file read. Pipelines are a few kilobytes; a file of thousands of them
/// fits many times over.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// Deepest nesting of mappings and lists. A pipeline nests about six levels
/// (`steps` → step → `runtime` → `tolerations` → toleration → value).
pub const MAX_DEPTH: usize = 64;

/// Parser options with Sluice's limits: at most [`MAX_DEPTH`] levels, a few thousand
/// anchors and aliases, and aliases that replay at most 20,000 events in all, so a
/// "billion laughs" document is refused after a bounded amount of work.
pub fn options() -> Options {
    options_with_depth(MAX_DEPTH)
}

/// [`options`] with at most `max_depth` levels (at most [`MAX_DEPTH`]).
pub fn options_with_depth(max_depth: usize) -> Options {
    let max_depth = max_depth.min(MAX_DEPTH);
    let mut budget = Budget::default();
    budget.max_depth = max_depth;
    budget.flow_nesting_limit = max_depth;
    budget.max_anchors = 5_000;
    budget.max_aliases = 5_000;
    budget.max_nodes = 500_000;
    budget.max_total_scalar_bytes = MAX_BYTES;
    let mut aliases = AliasLimits::default();
    aliases.max_total_replayed_events = 20_000;
    let mut options = Options::default();
    options.budget = Some(budget);
    options.alias_limits = aliases;
    // Errors are reported as file:line:column with their message; a snippet of the
    // source could quote a secret from the secrets file.
    options.with_snippet = false;
    options
}

/// Refuses a text longer than [`MAX_BYTES`] before it is parsed.
pub fn check_size(text: &str) -> Result<(), String> {
    if text.len() > MAX_BYTES {
        Err(format!(
            "the file is {} bytes, more than the {MAX_BYTES} bytes a YAML file may have",
            text.len()
        ))
    } else {
        Ok(())
    }
}
