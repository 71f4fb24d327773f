//! Printing results: aligned tables for people, JSON and YAML for scripts.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::args::Output;

/// Prints `value` as JSON or YAML; `table` is handled by the caller.
pub fn structured<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml | Output::Table => print!("{}", serde_saphyr::to_string(value)?),
    }
    Ok(())
}

/// Prints rows under a header with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Runs `draw` every 2 seconds until Ctrl-C (`--watch`). On a terminal each frame
/// replaces the last; piped, frames follow each other with a blank line between.
pub async fn watch<F, Fut>(shutdown: &CancellationToken, mut draw: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let terminal = std::io::stdout().is_terminal();
    loop {
        if terminal {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            print!("\x1b[2J\x1b[H");
            println!("every 2s, Ctrl-C to stop · {now}\n");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            drawn = draw() => drawn?,
        }
        let _ = std::io::stdout().flush();
        // The process's shutdown token, not a Ctrl-C listener of its own: one made here
        // would miss a signal that arrives while a frame is drawn, and --watch would
        // never end.
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if !terminal {
            println!();
        }
    }
}

/// A one-line progress indicator on stderr, only on a terminal: a spinner, what is
/// being waited for, and for how long. Lines printed through [`Spinner::println`]
/// appear above it.
#[derive(Debug)]
pub struct Spinner {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    pub fn start(text: impl Into<String>) -> Spinner {
        let text = std::sync::Arc::new(std::sync::Mutex::new(text.into()));
        let task = std::io::stderr().is_terminal().then(|| {
            let text = text.clone();
            tokio::spawn(async move {
                const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
                let started = std::time::Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                for frame in FRAMES.iter().cycle() {
                    tick.tick().await;
                    let line = text.lock().map(|t| t.clone()).unwrap_or_default();
                    eprint!("\r\x1b[2K{frame} {line} ({}s)", started.elapsed().as_secs());
                    let _ = std::io::stderr().flush();
                }
            })
        });
        Spinner { text, task }
    }

    pub fn set(&self, text: impl Into<String>) {
        if let Ok(mut t) = self.text.lock() {
            *t = text.into();
        }
    }

    /// Prints a line to stderr above the spinner.
    pub fn println(&self, line: &str) {
        if self.task.is_some() {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{line}");
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}
