//! Where things are in a manifest's text: byte offsets to line and column, and a value's span to
//! the dotted key that holds it. Used only to word errors; never fails.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A place in a manifest's text, both counted from 1. The column counts characters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Position {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1, in characters.
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` of `text` (clamped to the text, and to a char boundary).
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Every key of a parsed document with the spans of the key and of its value, so an error
/// reported at a span can name the key.
pub(crate) struct KeyMap {
    entries: Vec<KeyEntry>,
}

struct KeyEntry {
    path: String,
    key: Range<usize>,
    value: Range<usize>,
}

impl KeyMap {
    /// Collects the keys of `root`.
    pub(crate) fn new(root: &DeTable<'_>) -> Self {
        let mut entries = Vec::new();
        collect_table(root, "", &mut entries);
        Self { entries }
    }

    /// The dotted key whose key or value best encloses `span`: the innermost one. An empty span
    /// (what the parser gives for a problem of the whole document) names no key.
    pub(crate) fn path_at(&self, span: &Range<usize>) -> Option<&str> {
        if span.is_empty() {
            return None;
        }
        self.entries
            .iter()
            .filter(|e| encloses(&e.key, span) || encloses(&e.value, span))
            .min_by_key(|e| {
                let k = if encloses(&e.key, span) {
                    &e.key
                } else {
                    &e.value
                };
                k.end - k.start
            })
            .map(|e| e.path.as_str())
    }
}

fn encloses(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

fn collect_table(table: &DeTable<'_>, prefix: &str, out: &mut Vec<KeyEntry>) {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        collect_value(value, &path, out);
        out.push(KeyEntry {
            path,
            key: key.span(),
            value: value.span(),
        });
    }
}

fn collect_value(value: &Spanned<DeValue<'_>>, path: &str, out: &mut Vec<KeyEntry>) {
    match value.get_ref() {
        DeValue::Table(t) => collect_table(t, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                collect_value(item, &item_path, out);
                out.push(KeyEntry {
                    path: item_path,
                    key: item.span(),
                    value: item.span(),
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(
            Position::of_offset(text, 0),
            Position { line: 1, column: 1 }
        );
        assert_eq!(
            Position::of_offset(text, 6),
            Position { line: 2, column: 1 }
        );
        // After the two-byte 'é' the column counts characters, not bytes.
        assert_eq!(
            Position::of_offset(text, 9),
            Position { line: 2, column: 3 }
        );
        // Inside a multi-byte char and past the end are clamped, not panics.
        assert_eq!(
            Position::of_offset(text, 8),
            Position { line: 2, column: 2 }
        );
        assert_eq!(
            Position::of_offset(text, 999),
            Position { line: 3, column: 1 }
        );
    }
}
