//! ANSI colour codes in step output, turned into styled segments on the server: the
//! page shows classes (`ansi-red`, `ansi-bold`), never a raw escape code, and the text
//! of each segment is escaped like any other value.

use serde::Serialize;

/// A run of text in one style. `class` is empty for unstyled text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub class: String,
    pub text: String,
}

const COLOURS: [&str; 8] = [
    "black", "red", "green", "yellow", "blue", "magenta", "cyan", "white",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    bold: bool,
    /// 0–7, or 8–15 for the bright variants.
    fg: Option<u8>,
}

impl Style {
    fn class(self) -> String {
        let mut classes = Vec::new();
        if self.bold {
            classes.push("ansi-bold".to_owned());
        }
        if let Some(c) = self.fg {
            let name = COLOURS[usize::from(c % 8)];
            classes.push(if c >= 8 {
                format!("ansi-bright-{name}")
            } else {
                format!("ansi-{name}")
            });
        }
        classes.join(" ")
    }

    /// Applies one SGR parameter list (`1;31`); codes it does not style are ignored.
    fn apply(&mut self, params: &str) {
        if params.is_empty() {
            *self = Style::default();
            return;
        }
        for p in params.split(';') {
            match p.parse::<u8>() {
                Ok(0) => *self = Style::default(),
                Ok(1) => self.bold = true,
                Ok(22) => self.bold = false,
                Ok(n @ 30..=37) => self.fg = Some(n - 30),
                Ok(39) => self.fg = None,
                Ok(n @ 90..=97) => self.fg = Some(n - 90 + 8),
                _ => {}
            }
        }
    }
}

/// The segments of one line of output. Escape sequences other than colours (cursor
/// moves, titles) are dropped, as are other control characters except tabs.
pub fn segments(line: &str) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut style = Style::default();
    let mut text = String::new();
    let mut chars = line.chars().peekable();
    let flush = |out: &mut Vec<Segment>, text: &mut String, style: Style| {
        if !text.is_empty() {
            out.push(Segment {
                class: style.class(),
                text: std::mem::take(text),
            });
        }
    };
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            if !c.is_control() || c == '\t' {
                text.push(c);
            }
            continue;
        }
        match chars.peek() {
            Some('[') => {
                chars.next();
                let mut params = String::new();
                let mut end = None;
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        end = Some(c);
                        break;
                    }
                    params.push(c);
                }
                if end == Some('m') {
                    let mut next = style;
                    next.apply(&params);
                    if next != style {
                        flush(&mut out, &mut text, style);
                        style = next;
                    }
                }
            }
            Some(']') => {
                // An operating system command (a title, a hyperlink): up to BEL or ESC \.
                for c in chars.by_ref() {
                    if c == '\x07' || c == '\\' {
                        break;
                    }
                }
            }
            _ => {
                chars.next();
            }
        }
    }
    flush(&mut out, &mut text, style);
    out
}

/// The line without any escape code, as the raw download and search see it.
pub fn plain(line: &str) -> String {
    segments(line).into_iter().map(|s| s.text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(class: &str, text: &str) -> Segment {
        Segment {
            class: class.into(),
            text: text.into(),
        }
    }

    #[test]
    fn colours_become_classes_and_codes_disappear() {
        assert_eq!(
            segments("\x1b[31merror\x1b[0m: bad"),
            vec![seg("ansi-red", "error"), seg("", ": bad")]
        );
        assert_eq!(
            segments("\x1b[1;92mok\x1b[m"),
            vec![seg("ansi-bold ansi-bright-green", "ok")]
        );
        assert_eq!(segments("\x1b[2Kplain\x07"), vec![seg("", "plain")]);
        assert_eq!(segments("\x1b]0;title\x07x"), vec![seg("", "x")]);
        assert_eq!(plain("\x1b[31m<b>\x1b[0m"), "<b>");
        assert!(segments("").is_empty());
    }

    #[test]
    fn unknown_and_truncated_codes_never_panic() {
        for s in ["\x1b", "\x1b[", "\x1b[31", "\x1b[999;x;m", "é\x1b[38;5;1mé"] {
            let _ = segments(s);
        }
        assert_eq!(plain("é\x1b[38;5;1mé"), "éé");
    }
}
