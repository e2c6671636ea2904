//! Finds the line and column of a key path in YAML text.
//!
//! serde_yaml locates errors it raises while parsing, but checks that span
//! several keys (a certificate file that cannot be read, `m.server` without a
//! federation listener) run after parsing, when positions are gone. This
//! recovers them from the text for block and single-line flow styles, which is
//! what configs are written in. It only ever narrows a message, never decides
//! validity, so a miss falls back to the nearest enclosing key.

/// One step of a key path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    /// A key the user chose (an upstream's name).
    Name(String),
    Index(usize),
}

/// 1-based line and column of the deepest segment of `path` found in `text`.
pub fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut scope = Scope { first: 0, last: lines.len(), min_col: 0 };
    let mut found = None;
    for seg in path {
        let hit = match seg {
            Seg::Key(key) => find_key(&lines, &scope, key),
            Seg::Name(key) => find_key(&lines, &scope, key),
            Seg::Index(index) => find_item(&lines, &scope, *index),
        };
        let Some((line, col)) = hit else { break };
        found = Some((line + 1, col + 1));
        scope = Scope { first: line, last: block_end(&lines, line, col), min_col: col + 1 };
    }
    found
}

struct Scope {
    first: usize,
    last: usize,
    min_col: usize,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_meaningful(line: &str) -> bool {
    let trimmed = line.trim();
    !trimmed.is_empty() && !trimmed.starts_with('#')
}

/// The line after the last one that belongs to the node starting at (line, col).
fn block_end(lines: &[&str], line: usize, col: usize) -> usize {
    (line + 1..lines.len()).find(|&i| is_meaningful(lines[i]) && indent(lines[i]) <= col).unwrap_or(lines.len())
}

fn find_key(lines: &[&str], scope: &Scope, key: &str) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for (i, line) in lines.iter().enumerate().take(scope.last).skip(scope.first) {
        let code = line.split(" #").next().unwrap_or(line);
        let from = if i == scope.first { scope.min_col } else { 0 };
        let mut search = from;
        while let Some(offset) = code.get(search..).and_then(|rest| rest.find(key)) {
            let col = search + offset;
            let before = code[..col].chars().last();
            let after = code[col + key.len()..].trim_start_matches(['"', '\'']).trim_start();
            let starts_token = matches!(before, None | Some(' ' | '{' | ',' | '-' | '"' | '\''));
            if starts_token && after.starts_with(':') && col >= from {
                if best.is_none_or(|(_, best_col)| col < best_col) {
                    best = Some((i, col));
                }
                break;
            }
            search = col + key.len();
        }
    }
    best
}

fn find_item(lines: &[&str], scope: &Scope, index: usize) -> Option<(usize, usize)> {
    let dashes: Vec<(usize, usize)> = lines
        .iter()
        .enumerate()
        .take(scope.last)
        .skip(scope.first)
        .filter_map(|(i, line)| {
            let col = indent(line);
            (line[col..].starts_with("- ") || line[col..].trim_end() == "-").then_some((i, col))
        })
        .collect();
    let item_col = dashes.iter().map(|(_, col)| *col).min()?;
    dashes.into_iter().filter(|(_, col)| *col == item_col).nth(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
server_name: example.com
listeners:
  - { address: \"[::]:443\", tls: true, serves: [client] }
  - address: \"[::]:8448\"
    tls: true
tls:
  certificates:
    - cert: /a.pem
      key: /a.key
    - { cert: /b.pem, key: /b.key }
well_known:
  server: synapse.example.com:443
";

    #[test]
    fn finds_block_keys() {
        assert_eq!(locate(TEXT, &[Seg::Key("well_known"), Seg::Key("server")]), Some((12, 3)));
        assert_eq!(locate(TEXT, &[Seg::Key("server_name")]), Some((1, 1)));
    }

    #[test]
    fn finds_list_items_in_both_styles() {
        let key = [Seg::Key("tls"), Seg::Key("certificates"), Seg::Index(1), Seg::Key("key")];
        assert_eq!(locate(TEXT, &key), Some((10, 23)));
        let cert = [Seg::Key("tls"), Seg::Key("certificates"), Seg::Index(0), Seg::Key("key")];
        assert_eq!(locate(TEXT, &cert), Some((9, 7)));
        let tls = [Seg::Key("listeners"), Seg::Index(1), Seg::Key("tls")];
        assert_eq!(locate(TEXT, &tls), Some((5, 5)));
        let inline = [Seg::Key("listeners"), Seg::Index(0), Seg::Key("serves")];
        assert_eq!(locate(TEXT, &inline), Some((3, 39)));
    }

    #[test]
    fn a_missing_key_falls_back_to_its_parent() {
        assert_eq!(locate(TEXT, &[Seg::Key("well_known"), Seg::Key("client")]), Some((11, 1)));
        assert_eq!(locate(TEXT, &[Seg::Key("nothing")]), None);
    }
}
