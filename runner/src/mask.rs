//! Masks the values of a run's Secrets in its step output before it is stored, so
//! they never reach `SLUICE_LOGS` and so never the dashboard.
//!
//! Each value is masked as printed (`cat`, `echo $TOKEN`), line by line when it has
//! several lines, and in its base64 forms (standard and URL-safe, with and without
//! padding, of the value, of the value without its trailing newline and with one, and
//! the 76-column lines `base64` wraps a long encoding into). Every occurrence of every
//! form is found, overlapping ones included, and each stretch of masked text becomes
//! one [`MASK`]: where one value contains another the longer wins, and no part of
//! either is left showing.
//!
//! Forms shorter than [`MIN_LEN`] bytes are not masked: masking `a` or `1` would
//! replace every such letter in every log, and a value that short protects nothing.
//!
//! Output reaches the runner as lines (see [`crate::lines`]); a line longer than
//! [`crate::lines::MAX_LINE`] arrives in pieces, and [`StreamMasker`] masks a value
//! cut across two pieces in both. What it cannot see is not masked: a value the step
//! itself breaks over two lines, or transforms other than base64 (hex, URL or JSON
//! escaping, reversing, a prefix of it).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

use crate::{Error, Result};

/// What a masked value is replaced with.
pub const MASK: &str = "***";
/// The shortest form masked, in bytes.
pub const MIN_LEN: usize = 4;
/// The column at which `base64` (GNU coreutils, busybox) wraps its output.
const BASE64_WRAP: usize = 76;
/// The shortest last line of a wrapped encoding masked: one of four characters is
/// mostly padding (`Cg==` is a newline) and would be masked in unrelated output.
const MIN_WRAPPED: usize = 8;

/// Finds the forms of a run's secret values in a line. Never shows them: its `Debug`
/// says only how many forms it knows.
#[derive(Clone, Default)]
pub struct Masker {
    finder: Option<AhoCorasick>,
    forms: usize,
    /// Bytes of the longest form.
    longest: usize,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("forms", &self.forms)
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// A masker for `values` (a Secret's `data` values, raw bytes).
    pub fn new<V: AsRef<[u8]>>(values: impl IntoIterator<Item = V>) -> Result<Self> {
        let forms = forms(values);
        if forms.is_empty() {
            return Ok(Masker::default());
        }
        let finder = AhoCorasick::new(&forms).map_err(|e| Error::Mask {
            // The error says what limit was hit, never which pattern.
            problem: e.to_string(),
        })?;
        Ok(Masker {
            finder: Some(finder),
            forms: forms.len(),
            longest: forms.iter().map(String::len).max().unwrap_or(0),
        })
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.finder.is_none()
    }

    /// `line` with every form of every value replaced by [`MASK`].
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        let found = self.find(line);
        if found.is_empty() {
            Cow::Borrowed(line)
        } else {
            Cow::Owned(replace(line, found))
        }
    }

    /// Where forms occur in `text`, overlapping ones included.
    fn find(&self, text: &str) -> Vec<Range<usize>> {
        match &self.finder {
            Some(finder) => finder
                .find_overlapping_iter(text)
                .map(|m| m.range())
                .collect(),
            None => Vec::new(),
        }
    }

    /// The stretches of a value cut between `before` and `after` (pieces of one
    /// line): the part at the end of `before` and the part at the start of `after`.
    fn across(&self, before: &str, after: &str) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
        if self.is_empty() || before.is_empty() || after.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // A form cut in two has at most `longest - 1` bytes on either side.
        let reach = self.longest - 1;
        let mut start = before.len().saturating_sub(reach);
        while !before.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = reach.min(after.len());
        while !after.is_char_boundary(end) {
            end += 1;
        }
        let tail = &before[start..];
        let window = format!("{tail}{}", &after[..end]);
        let cut = tail.len();
        self.find(&window)
            .into_iter()
            .filter(|m| m.start < cut && m.end > cut)
            .map(|m| (start + m.start..before.len(), 0..m.end - cut))
            .unzip()
    }
}

/// Every form of `values` worth masking, longest first, each once.
fn forms<V: AsRef<[u8]>>(values: impl IntoIterator<Item = V>) -> Vec<String> {
    let mut out: Vec<String> = values
        .into_iter()
        .flat_map(|v| forms_of(v.as_ref()))
        .filter(|f| f.len() >= MIN_LEN)
        .collect();
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// How one value can appear in output; nothing for a value under [`MIN_LEN`] bytes
/// (its base64 forms are longer, but masking them would as surely give it away).
fn forms_of(value: &[u8]) -> Vec<String> {
    let trimmed = value.strip_suffix(b"\n").unwrap_or(value);
    if trimmed.len() < MIN_LEN {
        return Vec::new();
    }
    // Lines never hold a newline, so a value with several lines is masked line by
    // line. Output that is not UTF-8 is stored with replacement characters, and a
    // value that is not is looked for the same way.
    let text = String::from_utf8_lossy(value);
    let mut out: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
        .collect();
    // `echo "$TOKEN" | base64` encodes a newline the value may not have;
    // `printf %s "$(cat file)" | base64` drops one it has.
    let with_newline = [trimmed, b"\n"].concat();
    for bytes in [value, trimmed, &with_newline] {
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            out.push(engine.encode(bytes));
        }
        let wrapped = STANDARD.encode(bytes);
        if wrapped.len() > BASE64_WRAP {
            // Base64 is ASCII: every byte is a character boundary.
            out.extend(
                wrapped
                    .as_bytes()
                    .chunks(BASE64_WRAP)
                    .filter(|c| c.len() >= MIN_WRAPPED)
                    .map(|c| String::from_utf8_lossy(c).into_owned()),
            );
        }
    }
    out
}

/// `text` with each stretch covered by `found` (merged where they overlap or touch)
/// replaced by one [`MASK`].
fn replace(text: &str, mut found: Vec<Range<usize>>) -> String {
    found.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut current: Option<Range<usize>> = None;
    for r in found.into_iter().filter(|r| !r.is_empty()) {
        match &mut current {
            Some(c) if r.start <= c.end => c.end = c.end.max(r.end),
            _ => {
                if let Some(c) = current.replace(r) {
                    out.push_str(&text[at..c.start]);
                    out.push_str(MASK);
                    at = c.end;
                }
            }
        }
    }
    if let Some(c) = current {
        out.push_str(&text[at..c.start]);
        out.push_str(MASK);
        at = c.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Masks one container's output piece by piece. A line longer than
/// [`crate::lines::MAX_LINE`] arrives as pieces that continue one another; a piece
/// that continues is held until the next arrives, so a value cut between them is
/// masked in both. Each piece in gives exactly one line out, so counts of lines read
/// and lines stored stay comparable.
#[derive(Debug)]
pub struct StreamMasker {
    masker: Arc<Masker>,
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    text: String,
    /// Stretches found to continue into the piece after it.
    carried: Vec<Range<usize>>,
}

impl StreamMasker {
    pub fn new(masker: Arc<Masker>) -> Self {
        StreamMasker { masker, held: None }
    }

    /// The next piece of output; `continues` when its line goes on in the next piece.
    /// Returns the lines ready to store, in order.
    pub fn push(&mut self, text: String, continues: bool) -> [Option<String>; 2] {
        let mut carried = Vec::new();
        let before = self.held.take().map(|held| {
            let (end_of_held, start_of_this) = self.masker.across(&held.text, &text);
            carried = start_of_this;
            self.finish_piece(held.text, [held.carried, end_of_held].concat())
        });
        if continues && !self.masker.is_empty() {
            self.held = Some(Held { text, carried });
            return [before, None];
        }
        [before, Some(self.finish_piece(text, carried))]
    }

    /// The held piece, masked, when the output ends or breaks off after it.
    pub fn finish(&mut self) -> Option<String> {
        let held = self.held.take()?;
        Some(self.finish_piece(held.text, held.carried))
    }

    fn finish_piece(&self, text: String, mut found: Vec<Range<usize>>) -> String {
        found.extend(self.masker.find(&text));
        if found.is_empty() {
            text
        } else {
            replace(&text, found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&str]) -> Masker {
        Masker::new(values.iter().map(|v| v.as_bytes())).expect("masker")
    }

    fn mask(values: &[&str], line: &str) -> String {
        masker(values).mask(line).into_owned()
    }

    #[test]
    fn the_raw_value_is_masked_wherever_it_occurs() {
        assert_eq!(
            mask(&["s3cret-value"], "token=s3cret-value; again s3cret-value."),
            "token=***; again ***."
        );
        assert_eq!(mask(&["s3cret-value"], "s3cret-valu"), "s3cret-valu");
        assert_eq!(mask(&["s3cret-value"], "nothing here"), "nothing here");
    }

    #[test]
    fn base64_forms_are_masked() {
        let value = "hunter2???"; // encodes to characters where the alphabets differ
        let lines = [
            STANDARD.encode(value),
            STANDARD_NO_PAD.encode(value),
            URL_SAFE.encode(value),
            URL_SAFE_NO_PAD.encode(value),
            STANDARD.encode(format!("{value}\n")), // echo "$V" | base64
        ];
        assert_ne!(
            lines[0], lines[2],
            "the value must tell the alphabets apart"
        );
        for line in lines {
            assert_eq!(
                mask(&[value], &format!("b64: {line}")),
                "b64: ***",
                "{line}"
            );
        }
        // A value with a trailing newline, printed without it.
        let m = Masker::new([b"abcdef\n"]).expect("masker");
        assert_eq!(m.mask(&STANDARD.encode("abcdef")), "***");
        assert_eq!(m.mask("abcdef"), "***");
    }

    #[test]
    fn a_long_value_is_masked_in_the_lines_base64_wraps_it_into() {
        let value = "x".repeat(100);
        let encoded = STANDARD.encode(&value);
        let m = masker(&[&value]);
        for line in encoded.as_bytes().chunks(BASE64_WRAP) {
            let line = std::str::from_utf8(line).expect("ascii");
            assert_eq!(m.mask(line), "***", "{line}");
        }
    }

    #[test]
    fn each_line_of_a_multi_line_value_is_masked() {
        let key = "-----BEGIN KEY-----\r\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n-----END KEY-----\n";
        let m = masker(&[key]);
        assert_eq!(m.mask("MIIEvQIBADANBgkq"), "***");
        assert_eq!(m.mask("  hkiG9w0BAQEFAASC  "), "  ***  ");
        assert_eq!(m.mask("-----BEGIN KEY-----"), "***");
    }

    #[test]
    fn values_under_the_minimum_length_are_left_alone() {
        assert_eq!(MIN_LEN, 4);
        assert_eq!(mask(&["abc", "", "a"], "a abc abcd"), "a abc abcd");
        assert!(masker(&["abc", "", "\n\n"]).is_empty());
        // The 4-byte value is masked, and so are its base64 forms (all longer).
        assert_eq!(
            mask(&["abcd"], &format!("abcd {}", STANDARD.encode("abcd"))),
            "*** ***"
        );
        // A short line of a long value is not masked; its other lines are.
        assert_eq!(mask(&["ok\nlong-line"], "ok long-line"), "ok ***");
    }

    #[test]
    fn the_longest_match_wins_and_overlaps_leave_nothing_showing() {
        assert_eq!(mask(&["abcd", "abcdefgh"], "[abcdefgh]"), "[***]");
        assert_eq!(
            mask(&["abcdefgh", "abcd"], "[abcdefgh] [abcd]"),
            "[***] [***]"
        );
        // Two values overlapping in the text: one mask over both, no tail left.
        assert_eq!(mask(&["abcdef", "defghi"], "<abcdefghi>"), "<***>");
        // Touching values: one mask.
        assert_eq!(mask(&["abcd", "efgh"], "abcdefgh!"), "***!");
    }

    #[test]
    fn multi_byte_text_around_and_inside_values() {
        assert_eq!(mask(&["pässwörd"], "é pässwörd é"), "é *** é");
        // A value that is not UTF-8 is found as lossy output stores it, and in base64.
        let raw: &[u8] = b"ab\xffcd";
        let m = Masker::new([raw]).expect("masker");
        assert_eq!(m.mask("x ab\u{fffd}cd x"), "x *** x");
        assert_eq!(m.mask(&STANDARD.encode(raw)), "***");
    }

    #[test]
    fn debug_never_shows_a_value() {
        let shown = format!("{:?}", masker(&["s3cret-value"]));
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains(&STANDARD.encode("s3cret-value")), "{shown}");
    }

    fn stream(values: &[&str], pieces: &[(&str, bool)]) -> Vec<String> {
        let mut s = StreamMasker::new(Arc::new(masker(values)));
        let mut out: Vec<String> = pieces
            .iter()
            .flat_map(|(t, continues)| s.push((*t).to_owned(), *continues))
            .flatten()
            .collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn a_value_cut_between_two_pieces_of_a_long_line_is_masked_in_both() {
        assert_eq!(
            stream(
                &["s3cret-value"],
                &[
                    ("start s3cr", true),
                    ("et-value end", false),
                    ("next", false)
                ]
            ),
            ["start ***", "*** end", "next"]
        );
        // A line in three pieces, a value cut at each cut.
        assert_eq!(
            stream(
                &["0123456789"],
                &[("a01234", true), ("56789 01234", true), ("56789b", false)]
            ),
            ["a***", "*** ***", "***b"]
        );
        // Not covered: a form longer than a piece (64 KiB), spanning three.
        assert_eq!(
            stream(
                &["0123456789"],
                &[("a012", true), ("3456", true), ("789b", false)]
            ),
            ["a012", "3456", "789b"]
        );
        // Pieces that merely look like a start and an end of a value are left alone.
        assert_eq!(
            stream(&["s3cret-value"], &[("s3cr", true), ("xet-value", false)]),
            ["s3cr", "xet-value"]
        );
    }

    #[test]
    fn wherever_a_line_is_cut_no_part_of_the_value_shows() {
        let value = "s3cret-value";
        let text = format!("before {value} after");
        let start = "before ".len();
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            let out = stream(&[value], &[(a, true), (b, false)]);
            assert_eq!(out.len(), 2, "cut at {cut}");
            if cut <= start || cut >= start + value.len() {
                // The value is whole in one piece.
                assert_eq!(out.concat(), "before *** after", "cut at {cut}");
            } else {
                assert_eq!(out[0], "before ***", "cut at {cut}");
                assert_eq!(out[1], "*** after", "cut at {cut}");
            }
        }
    }

    #[test]
    fn every_piece_gives_one_line_and_whole_lines_are_not_held() {
        let pieces = [("one", false), ("two s3cret-value", false), ("thr", true)];
        let mut s = StreamMasker::new(Arc::new(masker(&["s3cret-value"])));
        let ready: Vec<Vec<String>> = pieces
            .iter()
            .map(|(t, c)| s.push((*t).into(), *c).into_iter().flatten().collect())
            .collect();
        assert_eq!(ready[0], ["one"]);
        assert_eq!(ready[1], ["two ***"]);
        assert!(
            ready[2].is_empty(),
            "a piece that continues waits for the next"
        );
        assert_eq!(s.finish().as_deref(), Some("thr"));
        assert_eq!(s.finish(), None);
        // Nothing to mask: nothing is held.
        let mut s = StreamMasker::new(Arc::new(Masker::default()));
        assert_eq!(s.push("part".into(), true), [None, Some("part".into())]);
    }

    #[test]
    fn a_cut_inside_a_multi_byte_character_window_is_safe() {
        // The longest form is 20 bytes, so the window reaches 19 bytes into each
        // piece: byte 11 of the first and byte 19 of the second fall inside a "é" and
        // an "ö". The value is still found, and no character is split.
        let value = "éxyzö-secret";
        let before = format!("{}xy", "é".repeat(14));
        let after = format!("zö-secret{}", "ö".repeat(6));
        assert!(!before.is_char_boundary(before.len() - 19));
        assert!(!after.is_char_boundary(19));
        assert_eq!(
            stream(&[value], &[(&before, true), (&after, false)]),
            [
                format!("{}***", "é".repeat(13)),
                format!("***{}", "ö".repeat(6))
            ]
        );
    }
}
