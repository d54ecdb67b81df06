//! docs/architecture.md names the workspace's files and folders by their paths from a
//! top folder (`runtime/model/src/engine/step.rs`, `compiler/src/plan/`): each must
//! exist, so the page cannot go on describing a module that was moved or removed.
#![allow(clippy::unwrap_used)]

use std::path::Path;

/// The workspace's top folders a checked path starts with.
const TOP: [&str; 8] = [
    "compiler/",
    "runtime/",
    "cli/",
    "tests/",
    "docs/",
    "templates/",
    "examples/",
    "scripts/",
];

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// Every path in `doc` that starts with a top folder (and is not the tail of a longer
/// word or path), without a sentence's closing period; sorted, each once.
fn named_paths(doc: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in doc.char_indices() {
        let starts = !prev.is_some_and(is_path_char);
        prev = Some(c);
        if !starts {
            continue;
        }
        let rest = &doc[i..];
        if !TOP.iter().any(|top| rest.starts_with(top)) {
            continue;
        }
        let end = rest.find(|c| !is_path_char(c)).unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches('.').to_string());
    }
    paths.sort();
    paths.dedup();
    paths
}

#[test]
fn paths_are_found_in_prose_code_and_lists() {
    let doc = "See `runtime/src/gpu/cuda.rs`, and compiler/src/plan/. A `moac-runtime/x` \
               and ../docs/x are not paths from the top; neither is xruntime/y.\n  - \
               `tests/compiler/abi_doc.rs`: the ABI page (docs/kernel-abi.md).";
    assert_eq!(
        named_paths(doc),
        [
            "compiler/src/plan/",
            "docs/kernel-abi.md",
            "runtime/src/gpu/cuda.rs",
            "tests/compiler/abi_doc.rs",
        ]
    );
}

#[test]
fn every_named_path_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let paths = named_paths(&doc);
    assert!(
        paths.iter().filter(|p| p.ends_with(".rs")).count() >= 10,
        "the page should name the workspace's modules by path; found {paths:?}"
    );
    let missing: Vec<&String> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names paths that do not exist (moved or removed? update the page): {missing:?}"
    );
}
