//! The floors of src/ that lib.rs declares are the floors the code keeps:
//! every `crate::` path in a top-level module names a module on a lower
//! floor. A path to its own floor or above would allow a cycle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Module -> floor (1 is the top), from lib.rs's numbered list.
fn declared_floors(lib: &str) -> BTreeMap<String, usize> {
    let mut floors = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else { continue };
        let Some((number, modules)) = rest.split_once(". ") else { continue };
        let Ok(floor) = number.parse::<usize>() else { continue };
        for module in modules.split(", ") {
            floors.insert(module.trim_matches('`').to_string(), floor);
        }
    }
    floors
}

/// The top-level modules a file's text names through `crate::`, also in
/// grouped form (`crate::{a, b::c}`).
fn imported_modules(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let preceded = text[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded {
            continue; // `matrix_edge_crate::`, not ours
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.push(name);
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_goes_down_a_floor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let floors = declared_floors(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(floors.len() >= 10, "lib.rs's floor list was not found: {floors:?}");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top =
            relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(&own) = floors.get(&top) else {
            wrong.push(format!("src/{top} is on no floor of lib.rs's list"));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for module in imported_modules(&text) {
            if module == top {
                continue;
            }
            match floors.get(&module) {
                Some(&floor) if floor > own => {}
                Some(&floor) => {
                    wrong.push(format!("{} (floor {own}) imports crate::{module} (floor {floor})", relative.display()))
                }
                None => wrong.push(format!("{} imports crate::{module}, which is on no floor", relative.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "imports that climb or stay on a floor:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_plain_and_grouped_paths() {
    let text = "use crate::config::Seg;\nuse crate::{edge::Edge, tls};\nlet x = crate::observe::metrics::METRICS;";
    assert_eq!(imported_modules(text), ["config", "edge", "tls", "observe"]);
    let floors = declared_floors("//! 1. `a`, `b`\n//! 2. `c`\n//! Not 3. a floor");
    assert_eq!(floors.get("b"), Some(&1));
    assert_eq!(floors.get("c"), Some(&2));
    assert_eq!(floors.len(), 3);
}
