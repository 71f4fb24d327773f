//! Splits a step's output into log lines.
//!
//! The output comes from code under test — a pull request from a fork can print
//! anything — so a line is cut at [`MAX_LINE`] bytes instead of growing the runner's
//! memory until a newline arrives, and bytes that are not UTF-8 are replaced instead
//! of ending the stream (which would lose every later line and, for a local process,
//! stall it once its pipe fills).

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest log line stored; a longer one is stored as several lines of at most
/// this many bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// One stored line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// The output's line goes on in the next piece: it was cut at [`MAX_LINE`].
    pub continues: bool,
}

/// Reads lines of at most [`MAX_LINE`] bytes.
#[derive(Debug)]
pub struct Lines<R> {
    reader: R,
    line: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines {
            reader,
            line: Vec::new(),
        }
    }

    /// The next line without its line ending; `None` at the end of the output.
    pub async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        Ok(self.next_piece().await?.map(|p| p.text))
    }

    /// The next line, or the next [`MAX_LINE`] bytes of a longer one, saying which.
    pub async fn next_piece(&mut self) -> std::io::Result<Option<Piece>> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(self.piece(self.line.len(), false)));
            }
            let room = MAX_LINE - self.line.len();
            // One byte more than fits: a newline right after a full line still ends
            // it, rather than making an empty line of its own.
            let window = &available[..available.len().min(room + 1)];
            if let Some(end) = window.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&window[..end]);
                self.reader.consume(end + 1);
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                return Ok(Some(self.piece(self.line.len(), false)));
            }
            if room == 0 {
                let cut = char_boundary(&self.line);
                return Ok(Some(self.piece(cut, true)));
            }
            let used = window.len().min(room);
            self.line.extend_from_slice(&window[..used]);
            self.reader.consume(used);
        }
    }

    fn piece(&mut self, len: usize, continues: bool) -> Piece {
        Piece {
            text: self.take(len),
            continues,
        }
    }

    /// Returns the first `len` bytes as text and keeps the rest for the next line.
    fn take(&mut self, len: usize) -> String {
        let rest = self.line.split_off(len);
        let line = std::mem::replace(&mut self.line, rest);
        // Moves the bytes when they are valid UTF-8, which is almost always.
        String::from_utf8(line)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Where to cut a full line so that a multi-byte character is not split across two
/// lines: before a trailing character that has not all its bytes yet.
fn char_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    // A UTF-8 character is at most 4 bytes: look back at most 3 for its first byte.
    for back in 1..=3.min(len) {
        let b = bytes[len - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: keep looking for the first byte
        }
        let width = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return len, // not UTF-8 at all: cut anywhere
        };
        return if width > back { len - back } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all(input: &[u8]) -> Vec<String> {
        // A tiny buffer so that lines arrive in many pieces, as from a pipe.
        let reader = tokio::io::BufReader::with_capacity(7, input);
        let mut lines = Lines::new(reader);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn splits_on_newlines_and_keeps_a_last_unterminated_line() {
        assert_eq!(
            all(b"one\ntwo\r\n\nthree").await,
            ["one", "two", "", "three"]
        );
        assert!(all(b"").await.is_empty());
    }

    #[tokio::test]
    async fn replaces_bytes_that_are_not_utf8_and_reads_on() {
        assert_eq!(
            all(b"ok\nbad \xff\xfe here\nafter\n").await,
            ["ok", "bad \u{fffd}\u{fffd} here", "after"]
        );
    }

    #[tokio::test]
    async fn cuts_a_line_longer_than_the_limit() {
        let mut input = vec![b'a'; MAX_LINE * 2 + 10];
        input.extend_from_slice(b"\nnext\n");
        let lines = all(&input).await;
        let lens: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 10, 4]);
        assert_eq!(lines[3], "next");
    }

    #[tokio::test]
    async fn says_which_pieces_continue_a_cut_line() {
        let mut input = vec![b'a'; MAX_LINE + 3];
        input.extend_from_slice(b"\nnext\nend");
        let mut lines = Lines::new(tokio::io::BufReader::with_capacity(7, &input[..]));
        let mut flags = Vec::new();
        while let Some(piece) = lines.next_piece().await.unwrap() {
            flags.push((piece.text.len(), piece.continues));
        }
        assert_eq!(
            flags,
            [(MAX_LINE, true), (3, false), (4, false), (3, false)]
        );
    }

    #[tokio::test]
    async fn never_splits_a_character_at_the_cut() {
        // "é" is two bytes; put one across the limit.
        let mut input = vec![b'a'; MAX_LINE - 1];
        input.extend_from_slice("é".as_bytes());
        input.extend_from_slice(b"z\n");
        let lines = all(&input).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE - 1);
        assert_eq!(lines[1], "éz");
        // A four-byte character ending exactly at the limit stays whole.
        let mut input = vec![b'a'; MAX_LINE - 4];
        input.extend_from_slice("🦀".as_bytes());
        input.extend_from_slice(b"\n");
        let lines = all(&input).await;
        assert_eq!(lines.len(), 1, "a newline right after a full line ends it");
        assert!(lines[0].ends_with('🦀'));
        assert_eq!(lines[0].len(), MAX_LINE);
    }
}
