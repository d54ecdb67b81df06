//! docs/kernel-abi.md lists every kind's entry parameters: they must be the ABI table's
//! (`moac::abi::params`), in its order, so the page cannot drift from the code.
#![allow(clippy::unwrap_used)]

use moac::ir::{KernelKind, PrefillMode};
use std::path::Path;

/// The parameter names of the first code block after `### <heading>`.
fn documented(doc: &str, heading: &str) -> Vec<String> {
    let start = doc
        .find(&format!("### {heading}"))
        .unwrap_or_else(|| panic!("no section {heading}"));
    let block = &doc[start..];
    let open = block.find("```\n(").unwrap() + 4;
    let mut depth = 0;
    let mut text = String::new();
    for line in block[open..].lines() {
        let code = line.split("//").next().unwrap();
        for c in code.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 1 => text.push(c),
                _ => {}
            }
        }
        text.push(' ');
        if depth == 0 {
            break;
        }
    }
    text.split(',')
        .map(|decl| {
            decl.split_whitespace()
                .last()
                .unwrap()
                .trim_start_matches('*')
                .to_string()
        })
        .collect()
}

#[test]
fn documented_parameters_are_the_abi_table() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kernel-abi.md"),
    )
    .unwrap();
    for (heading, kind) in [
        ("append", KernelKind::Append),
        ("fill", KernelKind::Fill),
        ("decode", KernelKind::Decode),
        ("merge", KernelKind::Merge),
        ("prefill", KernelKind::Prefill(PrefillMode::Block64)),
        ("prefill", KernelKind::Prefill(PrefillMode::Token)),
    ] {
        let table: Vec<&str> = moac::abi::params(kind).iter().map(|p| p.0).collect();
        assert_eq!(
            documented(&doc, heading),
            table,
            "docs/kernel-abi.md, {heading}"
        );
    }
}
