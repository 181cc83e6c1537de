//! The layering rule of `lib.rs`, checked on the source: every top-level
//! module imports only modules listed before it in [`LAYERS`], and no two
//! files depend on each other, however indirectly. A new module must be
//! placed in the list, which is where its layer is decided.
//!
//! References are read from the text (`crate::a::b`, `super::c`, grouped
//! `super::{c, d}`), comments excluded: coarser than the compiler's view,
//! but it cannot miss an import, and it needs no tool beyond the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. A module may depend only on modules before it.
const LAYERS: &[&str] = &[
    "sync",
    "crash_point",
    "dedup_table",
    "metrics",
    "stages",
    "hot_entity",
    "load",
    "meta",
    "moved",
    "retention",
    "archive_manifest",
    "command",
    "type_config",
    "clock",
    "dedup",
    "config",
    "tls",
    "storage",
    "raft",
    "processor",
    "node",
    "partition_view",
    "checkpointer",
    "reconciler",
    "expiry",
    "archiver",
    "api",
    "server",
];

/// Module path (`api::ingest`) of every source file, test files excluded
/// (they belong to the module they test).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                if stem.ends_with("_tests") || (prefix.is_empty() && matches!(stem, "lib" | "main")) {
                    continue;
                }
                let mut p = prefix.to_vec();
                if stem != "mod" {
                    p.push(stem.to_string());
                }
                out.insert(p.join("::"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

fn idents(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The modules a file refers to, resolved against the known module paths.
fn references(module: &str, text: &str, known: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let parent: Vec<&str> = module.split("::").collect();
    let parent = parent[..parent.len().saturating_sub(1)].join("::");
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" //").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    for token in idents(&code) {
        let segments: Vec<&str> = token.split("::").filter(|s| !s.is_empty()).collect();
        match segments.first() {
            Some(&"crate") => paths.push(segments[1..].iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            Some(&"super") => {
                let mut p: Vec<String> = parent.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
                p.extend(segments[1..].iter().map(|s| s.to_string()));
                paths.push(p);
            }
            _ => {}
        }
    }
    // `super::{a, b}`: the braces split the token above; add each name.
    for group in code.split("super::{").skip(1) {
        let inner = group.split('}').next().unwrap_or("");
        for name in inner.split(',').map(|n| n.trim().split("::").next().unwrap_or("").trim()) {
            if !name.is_empty() {
                let p: Vec<String> = parent
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .chain([name.to_string()])
                    .collect();
                paths.push(p);
            }
        }
    }
    let mut out = BTreeSet::new();
    for path in paths {
        // The longest prefix that names a module file.
        for len in (1..=path.len()).rev() {
            let candidate = path[..len].join("::");
            if known.contains_key(&candidate) {
                out.insert(candidate);
                break;
            }
        }
    }
    out.remove(module);
    out
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// A module and its own submodules may name each other (a parent declares
/// and re-exports its children; children use the parent's shared items).
fn nested(a: &str, b: &str) -> bool {
    a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    known
        .iter()
        .map(|(module, path)| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let refs = references(module, &text, &known).into_iter().filter(|r| !nested(module, r)).collect();
            (module.clone(), refs)
        })
        .collect()
}

#[test]
fn every_top_level_module_has_a_layer_and_imports_only_below_it() {
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, refs) in &graph {
        let Some(&own) = rank.get(top(module)) else {
            wrong.push(format!("{module}: its top-level module is not in LAYERS"));
            continue;
        };
        for r in refs.iter().filter(|r| top(r) != top(module)) {
            match rank.get(top(r)) {
                Some(&theirs) if theirs < own => {}
                _ => wrong.push(format!("{module} imports {r}, which is not below it")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let graph = graph();
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m.as_str()) {
            let cycle = visit(m, &graph, &mut state, &mut Vec::new());
            assert!(cycle.is_none(), "modules depend on each other: {}", cycle.unwrap_or_default().join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    let known: BTreeMap<String, PathBuf> = ["api", "api::ingest", "api::propose", "node", "raft", "raft::ticker"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    let text = "use super::{batch_limits, propose};\nuse crate::node::{Listener, Node};\n// crate::raft::ticker in a comment\nlet x = crate::raft::ticker::TICK;";
    let refs = references("api::ingest", text, &known);
    // `super::batch_limits` is no file of its own here: it resolves to `api`.
    let want = ["api", "api::propose", "node", "raft::ticker"];
    assert_eq!(refs, want.iter().map(|s| s.to_string()).collect());
}
