//! The architecture, checked: the modules under `src/` import one way only.
//!
//! Reads every source file (comments and `#[cfg(test)] mod tests` left
//! out), resolves each `crate::` and `super::` path to the file it names,
//! and fails on an import that goes up a layer or across one, on a
//! top-level module no layer lists, and on a circle between files. A
//! folder's `mod.rs` naming its own children (`use task::HostTask`) is how
//! a folder is put together, not an import between rooms: not counted.
//! README "Layout" says what each layer holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, low to high. A module may import from the layers below its
/// own and from within its own module, never from its own layer's other
/// modules or from above.
const LAYERS: &[&[&str]] = &[
    // Pure wire formats; passive counters any layer may bump. Both import
    // nothing from the crate.
    &["protocol", "metrics"],
    // The typed config (and the names it parses into): the vocabulary of
    // every layer above.
    &["config"],
    // Certificates, their store, the host table and the resolver.
    &["tls"],
    // What senders and mail clients learn about each mail domain: MTA-STS
    // policies, autoconfig documents, the DNS records pointing to them.
    &["discovery"],
    // The store several instances share (etcd): locks, records, the watch;
    // DNS updates and queries for dns-01.
    &["cluster", "dns"],
    // Obtains and renews certificates; reports through acme::Observer,
    // never to the proxy or the operator side directly.
    &["acme"],
    // A session's life: accept, dialogue, handshake, backend, relay.
    &["proxy"],
    // The operator's side: admin, control socket, notifications, logs,
    // reload triggers. Reads the server's state through ops::View.
    &["ops"],
    // Binds, builds snapshots, runs and reloads: the one module that
    // knows every other.
    &["server"],
];

/// Top-level files that are not modules of a layer.
const ROOTS: &[&str] = &["lib.rs", "main.rs"];

#[test]
fn imports_run_down_the_layers_and_never_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = modules(&root.join("src"));
    let shown = |file: &Path| {
        file.strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string()
    };
    let known: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));

    let mut problems = Vec::new();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &files {
        let Some(top) = module.first() else { continue };
        let Some(own) = layer(top) else {
            problems.push(format!(
                "{}: top-level module `{top}` is in no layer of tests/layout.rs",
                shown(file)
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, path) in paths(&without_tests(&text), module) {
            let Some(target) = resolve(&path, &known) else {
                continue;
            };
            let there = &target[0];
            if there != top {
                match layer(there) {
                    Some(l) if l < own => {}
                    _ => problems.push(format!(
                        "{}:{line}: `{top}` imports `{}`, which is not below it",
                        shown(file),
                        target.join("::")
                    )),
                }
            }
            if target != *module {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    for circle in circles(&graph) {
        let names: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
        problems.push(format!("a circle: {}", names.join(" -> ")));
    }
    assert!(
        problems.is_empty(),
        "the module graph breaks the layering:\n{}",
        problems.join("\n")
    );
}

/// Every module file under `src`, by its module path (`proxy/http.rs` is
/// `["proxy", "http"]`, `proxy/mod.rs` is `["proxy"]`). Files of test
/// modules (`tests.rs`) are left out.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".rs") || name == "tests.rs" {
                continue;
            }
            if dir == src && ROOTS.contains(&name.as_str()) {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().map(String::as_str) == Some("mod") {
                module.pop();
            }
            out.insert(module, path);
        }
    }
    out
}

/// The source without its unit tests (a module's `tests` come last) and
/// without comments.
fn without_tests(text: &str) -> String {
    let mut code = String::new();
    let mut attribute_test = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let declares_tests = trimmed.starts_with("mod tests")
            || trimmed.starts_with("pub(super) mod tests")
            || trimmed.starts_with("pub(crate) mod tests");
        if attribute_test && declares_tests {
            break;
        }
        attribute_test = trimmed.starts_with("#[cfg(test)]");
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Every path that starts with `crate::` or `super::` (a `{ … }` group
/// gives one path per item), made absolute, with its line number.
fn paths(code: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let start = if rest.starts_with(b"crate::") {
            Some((Vec::new(), at + "crate::".len()))
        } else if rest.starts_with(b"super::") {
            // `super` of `a::b` (`a/b.rs` or `a/b/mod.rs`) is `a`.
            let mut base = module.to_vec();
            base.pop();
            let mut next = at + "super::".len();
            while bytes[next..].starts_with(b"super::") {
                base.pop();
                next += "super::".len();
            }
            Some((base, next))
        } else {
            None
        };
        let boundary = at == 0 || !is_ident(bytes[at - 1]);
        match start {
            Some((base, next)) if boundary => {
                let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
                let (found, end) = tree(code, next, base);
                out.extend(found.into_iter().map(|p| (line, p)));
                at = end;
            }
            _ => at += 1,
        }
    }
    out
}

/// Parses a use tree at `at` (`a::b`, `a::{b, c::d}`, `*`), prefixed by
/// `base`; returns the paths and where the tree ends.
fn tree(code: &str, mut at: usize, mut base: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let bytes = code.as_bytes();
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'{' {
            let mut out = Vec::new();
            at += 1;
            loop {
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return (out, at + 1);
                }
                let (found, end) = tree(code, at, base.clone());
                out.extend(found);
                at = end;
            }
        }
        let start = at;
        while at < bytes.len() && is_ident(bytes[at]) {
            at += 1;
        }
        // ASCII only, so these are character boundaries.
        let ident = &code[start..at];
        if !ident.is_empty() && ident != "self" {
            base.push(ident.to_string());
        }
        if bytes[at..].starts_with(b"::") {
            at += 2;
            continue;
        }
        return (vec![base], at.max(start + 1));
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The module a path names: its longest prefix that is a module file.
fn resolve(path: &[String], known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
}

/// The circles of a directed graph (its strongly connected components
/// with more than one node), each as a list of its nodes.
fn circles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    // Kosaraju: an order by finishing time, then the reversed graph.
    let nodes: BTreeSet<&Vec<String>> = graph
        .iter()
        .flat_map(|(a, bs)| std::iter::once(a).chain(bs))
        .collect();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for &n in &nodes {
        finish(n, graph, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (a, bs) in graph {
        for b in bs {
            reverse.entry(b).or_default().push(a);
        }
    }
    let mut placed = BTreeSet::new();
    let mut out = Vec::new();
    for n in order.into_iter().rev() {
        if placed.contains(n) {
            continue;
        }
        let mut component = Vec::new();
        let mut stack = vec![n];
        placed.insert(n);
        while let Some(m) = stack.pop() {
            component.push(m.clone());
            for &p in reverse.get(m).into_iter().flatten() {
                if placed.insert(p) {
                    stack.push(p);
                }
            }
        }
        if component.len() > 1 {
            component.sort();
            out.push(component);
        }
    }
    out
}

fn finish<'g>(
    n: &'g Vec<String>,
    graph: &'g BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    seen: &mut BTreeSet<&'g Vec<String>>,
    order: &mut Vec<&'g Vec<String>>,
) {
    if !seen.insert(n) {
        return;
    }
    for m in graph.get(n).into_iter().flatten() {
        finish(m, graph, seen, order);
    }
    order.push(n);
}

/// The checker itself, on a small made-up tree: a circle and an import
/// upwards are both found.
#[test]
fn the_checker_finds_circles_and_upward_imports() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let known: BTreeSet<Vec<String>> = [m("proxy"), m("proxy::http"), m("proxy::session")]
        .into_iter()
        .collect();
    let code = "use super::session::{Outcome, x::y};\nuse crate::{ops::View, proxy::http};\n";
    let found: Vec<Vec<String>> = paths(code, &m("proxy::http"))
        .into_iter()
        .filter_map(|(_, p)| resolve(&p, &known))
        .collect();
    assert_eq!(
        found,
        [m("proxy::session"), m("proxy::session"), m("proxy::http")]
    );
    let ops = paths(code, &m("proxy::http"));
    assert_eq!(ops[2], (2, m("ops::View")));

    let mut graph = BTreeMap::new();
    graph.insert(
        m("proxy::http"),
        [m("proxy::session")].into_iter().collect(),
    );
    graph.insert(
        m("proxy::session"),
        [m("proxy::http")].into_iter().collect(),
    );
    graph.insert(
        m("proxy::listener"),
        [m("proxy::session")].into_iter().collect(),
    );
    assert_eq!(
        circles(&graph),
        [vec![m("proxy::http"), m("proxy::session")]]
    );
    let code = "#[cfg(test)]\nmod tests {\n    use crate::server::Server;\n}\n";
    assert!(paths(&without_tests(code), &m("tls")).is_empty());
}
