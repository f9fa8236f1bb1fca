//! The README's layout section is the code's: each of its `folder -> dependencies` lines lists
//! exactly the top-level modules whose `crate::` paths that folder's code uses (comments aside),
//! and the graph they make has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level module each `crate::NAME` path under `src/` names, per top-level module.
fn code_dependencies() -> Graph {
    let mut graph = Graph::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let uses = graph.entry(top.clone()).or_default();
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String =
                        line[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if name != top {
                        uses.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// The README's `    name -> a, b` lines of the layout section.
fn readme_dependencies() -> Graph {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## Layout of the code").nth(1).expect("a layout section");
    let section = section.split("\n## ").next().unwrap();
    let mut graph = Graph::new();
    for line in section.lines().filter(|l| l.starts_with("    ") && l.contains("->")) {
        let (name, uses) = line.split_once("->").unwrap();
        let uses = uses.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        graph.insert(name.trim().to_string(), uses);
    }
    graph
}

#[test]
fn the_readme_layout_is_the_code_s_and_has_no_cycle() {
    let (code, readme) = (code_dependencies(), readme_dependencies());
    assert_eq!(readme, code, "README's layout section (left) against the code (right)");
    // Depth-first: a module reached again while still on the path closes a cycle.
    fn visit(graph: &Graph, name: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(name) {
            return;
        }
        assert!(!path.iter().any(|p| p == name), "a cycle: {} -> {name}", path.join(" -> "));
        path.push(name.to_string());
        for next in graph.get(name).into_iter().flatten() {
            visit(graph, next, path, done);
        }
        path.pop();
        done.insert(name.to_string());
    }
    let mut done = BTreeSet::new();
    for name in code.keys() {
        visit(&code, name, &mut Vec::new(), &mut done);
    }
}
