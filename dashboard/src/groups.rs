//! Group markers in step output, folded on the server: GitHub's `::group::<title>` …
//! `::endgroup::` and GitLab's `section_start:<ts>:<name>[options]\r\e[0K<title>` …
//! `section_end:<ts>:<name>`. A step's lines become rows a template renders as nested
//! `<details>`; the titles are attacker controlled and escaped like any other text.

use serde::Serialize;

use crate::ansi;
use crate::read::Line;

/// What a line that is a group marker says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mark", rename_all = "lowercase")]
pub enum Mark {
    /// A group starts. `name` is empty for GitHub's groups (they do not nest), the
    /// section's name for GitLab's; `collapsed` is how it opens.
    Start {
        name: String,
        title: String,
        collapsed: bool,
    },
    /// The innermost open group of that `name` ends.
    End { name: String },
}

/// The marker `raw` (one stored line, escape codes and all) is, if any.
pub fn mark(raw: &str) -> Option<Mark> {
    let mut s = raw;
    // GitLab puts an erase-line code in front, GitHub nothing; both may be coloured.
    while let Some(rest) = s.strip_prefix("\x1b[0K") {
        s = rest;
    }
    if let Some(rest) = s.strip_prefix("section_start:") {
        let (_, rest) = rest.split_once(':')?;
        let (head, title) = rest.split_once('\r').unwrap_or((rest, ""));
        let (name, options) = match head.split_once('[') {
            Some((name, options)) => (name, options.trim_end_matches(']')),
            None => (head, ""),
        };
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let title = ansi::plain(title).trim().to_owned();
        return Some(Mark::Start {
            name: name.to_owned(),
            title: if title.is_empty() {
                name.to_owned()
            } else {
                title
            },
            collapsed: options.split(',').any(|o| o.trim() == "collapsed=true"),
        });
    }
    if let Some(rest) = s.strip_prefix("section_end:") {
        let (_, rest) = rest.split_once(':')?;
        let name = rest.split('\r').next().unwrap_or_default().trim();
        return (!name.is_empty()).then(|| Mark::End {
            name: name.to_owned(),
        });
    }
    let plain = ansi::plain(raw);
    if let Some(title) = plain.strip_prefix("::group::") {
        return Some(Mark::Start {
            name: String::new(),
            title: title.trim().to_owned(),
            collapsed: true,
        });
    }
    (plain.trim_end() == "::endgroup::").then(|| Mark::End {
        name: String::new(),
    })
}

/// One row of a step's rendered log.
#[derive(Debug, Clone)]
pub enum Row {
    Line(Line),
    /// A group's first line: its title, then its lines up to the matching [`Row::Close`].
    Open(Group),
    Close,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub line: Line,
    pub name: String,
    pub title: String,
    pub open: bool,
    /// No end marker follows in these lines (the group goes on, or never ended).
    pub unclosed: bool,
}

/// The rows of `lines`: each start marker opens a group, and an end marker closes the
/// innermost open group of its name (and any opened inside it); an end with no such
/// group is a plain line. Groups still open at the end are closed, marked `unclosed`
/// and shown open.
pub fn rows(lines: Vec<Line>) -> Vec<Row> {
    let mut out = Vec::with_capacity(lines.len());
    // Indexes in `out` of the open groups, innermost last.
    let mut open: Vec<usize> = Vec::new();
    for line in lines {
        match line.group.clone() {
            Some(Mark::Start {
                name,
                title,
                collapsed,
            }) => {
                open.push(out.len());
                out.push(Row::Open(Group {
                    line,
                    name,
                    title,
                    open: !collapsed,
                    unclosed: false,
                }));
            }
            Some(Mark::End { name }) => {
                let depth = open.iter().rposition(|&i| match &out[i] {
                    Row::Open(g) => g.name == name,
                    _ => false,
                });
                match depth {
                    Some(depth) => {
                        // Inner groups the end skips over close here too.
                        for _ in depth + 1..open.len() {
                            open.pop();
                            out.push(Row::Close);
                        }
                        out.push(Row::Line(line));
                        open.pop();
                        out.push(Row::Close);
                    }
                    None => out.push(Row::Line(line)),
                }
            }
            None => out.push(Row::Line(line)),
        }
    }
    while let Some(i) = open.pop() {
        if let Row::Open(g) = &mut out[i] {
            g.unclosed = true;
            g.open = true;
        }
        out.push(Row::Close);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(name: &str, title: &str, collapsed: bool) -> Option<Mark> {
        Some(Mark::Start {
            name: name.into(),
            title: title.into(),
            collapsed,
        })
    }

    #[test]
    fn github_and_gitlab_markers_are_recognised() {
        assert_eq!(mark("::group::Build <b>"), start("", "Build <b>", true));
        assert_eq!(
            mark("\x1b[36m::group::Test\x1b[0m"),
            start("", "Test", true)
        );
        assert_eq!(
            mark("::endgroup::"),
            Some(Mark::End {
                name: String::new()
            })
        );
        assert_eq!(
            mark("\x1b[0Ksection_start:1700000000:deps[collapsed=true]\r\x1b[0K\x1b[1mInstall deps\x1b[0m"),
            start("deps", "Install deps", true)
        );
        assert_eq!(
            mark("section_start:1700000000:build\r\x1b[0K"),
            start("build", "build", false)
        );
        assert_eq!(
            mark("\x1b[0Ksection_end:1700000001:deps\r\x1b[0K"),
            Some(Mark::End {
                name: "deps".into()
            })
        );
        for plain in [
            "echo ::group::x",
            "section_start:",
            "section_start:1",
            "section_end:1:",
            "::endgroup:: and more",
            "",
        ] {
            assert_eq!(mark(plain), None, "{plain:?}");
        }
    }

    fn render(rows: &[Row]) -> String {
        rows.iter()
            .map(|r| match r {
                Row::Line(l) => format!("{} ", l.n),
                Row::Open(g) => format!(
                    "[{}{}{} ",
                    g.line.n,
                    if g.open { "+" } else { "" },
                    if g.unclosed { "…" } else { "" }
                ),
                Row::Close => "] ".into(),
            })
            .collect::<String>()
            .trim_end()
            .to_owned()
    }

    #[test]
    fn groups_nest_close_by_name_and_stay_open_when_unfinished() {
        let text = [
            "a",
            "::group::one",
            "b",
            "::endgroup::",
            "section_start:1:outer\rOuter",
            "section_start:2:inner[collapsed=true]\rInner",
            "c",
            "section_end:3:outer",
            "::endgroup::",
            "::group::last",
            "d",
        ];
        let lines = text
            .iter()
            .enumerate()
            .map(|(i, t)| Line::new(i as u64 + 1, t))
            .collect();
        assert_eq!(
            render(&rows(lines)),
            "1 [2 3 4 ] [5+ [6 7 ] 8 ] 9 [10+… 11 ]"
        );
    }
}
