//! The broker crate's modules import each other without a cycle (ARCHITECTURE.md:
//! leaves — config, errors, files, partition, registry, topic, ... — below
//! `broker`, the replication and plugin modules above it, the typed
//! operations in `api` above those, and the wire adapter on top). A new
//! `use crate::x` that closes a cycle fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};

#[test]
fn modules_import_each_other_without_a_cycle() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().to_string();
        // A directory is one module (its files may import each other).
        let text = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(&path).unwrap().map(|f| f.unwrap().path()).collect();
            files.sort();
            files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect::<Vec<_>>().join("\n")
        } else {
            std::fs::read_to_string(&path).unwrap()
        };
        let uses = text
            .split("crate::")
            .skip(1)
            .map(|rest| rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect::<String>())
            .filter(|m| !m.is_empty() && *m != module)
            .collect();
        imports.insert(module, uses);
    }
    assert!(imports.len() > 10, "read the modules in {}", src.display());
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m.to_owned());
        for next in imports.get(m).into_iter().flatten() {
            visit(next, imports, path, done);
        }
        path.pop();
        done.insert(m.to_owned());
    }
    let mut done = BTreeSet::new();
    for m in imports.keys() {
        visit(m, &imports, &mut Vec::new(), &mut done);
    }
}
