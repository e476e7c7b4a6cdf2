//! The router's top-level modules import each other in one direction
//! only: no cycle (hostnet and reconcile once imported each other). Read
//! from the sources: `crate::name` paths in code (comments and tests
//! left out), per top-level module (a folder counts as one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir)
        .expect("reading router/src")
        .flatten()
    {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module names a piece of code refers to as `crate::name` or inside
/// `use crate::{a, b::c}`.
fn refers(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for part in inner.split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("");
        if matches!(first, "main.rs" | "lib.rs" | "bin") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(f).expect("reading a source file");
        let deps = refers(&code(&text));
        graph.entry(module).or_default().extend(deps);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for (m, deps) in graph.iter_mut() {
        deps.retain(|d| d != m && modules.contains(d));
    }
    assert!(
        graph
            .get("hostnet")
            .is_some_and(|d| !d.contains("reconcile")),
        "hostnet imports reconcile: {:?}",
        graph.get("hostnet")
    );
    // A cycle: a module that reaches itself.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph[start].iter().collect();
        let mut path = BTreeMap::new();
        for d in &todo {
            path.insert((*d).clone(), start.clone());
        }
        while let Some(m) = todo.pop() {
            if m == start {
                let mut chain = vec![start.clone()];
                let mut at = path.get(start).cloned();
                while let Some(p) = at {
                    if &p == start {
                        break;
                    }
                    chain.push(p.clone());
                    at = path.get(&p).cloned();
                }
                panic!("module {start} reaches itself through {chain:?}; graph: {graph:#?}");
            }
            if !seen.insert(m.clone()) {
                continue;
            }
            for d in graph.get(m).into_iter().flatten() {
                path.entry(d.clone()).or_insert_with(|| m.clone());
                todo.push(d);
            }
        }
    }
}
