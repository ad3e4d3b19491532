//! The library's modules form layers that point one way: a module uses only
//! modules of lower layers. This test reads the sources and fails on any
//! reference that points up or sideways, so the structure stays as the crate
//! docs describe it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module and its layer; a module may use only modules of a
/// lower layer (two modules of one layer may not use each other).
const LAYERS: &[(&str, u32)] = &[
    ("process", 0),
    ("procfs", 0),
    ("sync", 0),
    ("sys", 1),
    ("sticky", 1),
    ("redis_link", 1),
    ("protocol", 2),
    ("channel", 3),
    ("message", 3),
    ("handshake", 4),
    ("error", 5),
    ("listeners", 6),
    ("primary", 7),
    ("worker", 7),
    ("supervisor", 8),
    ("fanout", 8),
    ("pool", 9),
    ("bus", 9),
    ("store", 9),
    ("telemetry", 9),
];

/// Items of the crate root that any module may use: constants and modules of
/// its own, no behaviour.
const ROOT_ITEMS: &[&str] = &["CHANNEL_FD", "WORKER_MARKER", "env_keys"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
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

/// The top-level module a file belongs to (`None` for the crate root).
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_string())
}

/// What the crate root re-exports, by name: `pub use module::{A, B};`.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut names = BTreeMap::new();
    for statement in lib.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim_matches(|c| c == '{' || c == '}');
        for item in items.split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            if !name.is_empty() {
                names.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    names
}

/// Every `crate::name` a file mentions, outside comments, with its line.
fn crate_references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !name.is_empty() && !preceded_by_ident {
                found.push((number + 1, name.clone()));
            }
            // `use crate::{a, b}` names several.
            if let Some(grouped) = after.strip_prefix('{') {
                let group = grouped.split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let item: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !item.is_empty() {
                        found.push((number + 1, item));
                    }
                }
            }
            rest = after;
        }
    }
    found
}

#[test]
fn modules_use_only_lower_layers() {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let reexports = root_reexports();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(&layer) = layers.get(module.as_str()) else {
            violations.push(format!(
                "{}: module {module:?} has no layer in this test's table",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, name) in crate_references(&text) {
            if ROOT_ITEMS.contains(&name.as_str()) {
                continue;
            }
            let target = reexports.get(&name).cloned().unwrap_or(name.clone());
            if target == module {
                continue;
            }
            let Some(&target_layer) = layers.get(target.as_str()) else {
                violations.push(format!(
                    "{}:{line}: uses crate::{name}, which is neither a module with a layer nor a root re-export",
                    file.display()
                ));
                continue;
            };
            if target_layer >= layer {
                violations.push(format!(
                    "{}:{line}: {module} (layer {layer}) uses {target} (layer {target_layer})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "references that point up or sideways:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_inline_references() {
    let refs = crate_references(
        "use crate::{channel::X, sync::lock};\nlet a = crate::primary::f(); // crate::worker\n",
    );
    let names: Vec<&str> = refs.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["channel", "sync", "primary"]);
}
