//! A line diff of two YAML documents, for `sinewctl diff` and `apply --dry-run`.
//!
//! Policy documents are a few dozen lines, so a plain longest-common-subsequence table is
//! fast enough and needs no dependency. The output reads like `diff -u`: changed lines with
//! `-`/`+`, three lines of context around them, `@@` between hunks.

/// One line of the edit script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// Lines of context kept around a change.
const CONTEXT: usize = 3;

/// The changes from `old` to `new` under a `--- old_label` / `+++ new_label` header; empty
/// when the two are the same.
pub fn render(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    let ops = edit_script(old, new);
    if ops.iter().all(|op| matches!(op, Op::Same(_))) {
        return String::new();
    }
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Same(_)))
        .map(|(i, _)| i)
        .collect();
    let near_change = |i: usize| changed.iter().any(|&c| c.abs_diff(i) <= CONTEXT);
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    let mut skipped = false;
    for (i, op) in ops.iter().enumerate() {
        if !near_change(i) {
            skipped = true;
            continue;
        }
        if skipped {
            out.push_str("@@\n");
        }
        skipped = false;
        let (mark, line) = match op {
            Op::Same(line) => (' ', line),
            Op::Removed(line) => ('-', line),
            Op::Added(line) => ('+', line),
        };
        out.push(mark);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The shortest edit script from `old` to `new`, by lines (removals before additions).
fn edit_script<'a>(old: &'a str, new: &'a str) -> Vec<Op<'a>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(a.len().max(b.len()));
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push(Op::Same(a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(Op::Removed(a[i]));
            i += 1;
        } else {
            ops.push(Op::Added(b[j]));
            j += 1;
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_has_no_diff() {
        assert_eq!(render("a\nb\n", "a\nb\n", "x", "y"), "");
    }

    #[test]
    fn a_change_shows_with_context_and_hunks() {
        let old: String = (1..=12).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l2\n", "l2x\n").replace("l11\n", "");
        assert_eq!(
            render(&old, &new, "live", "file"),
            "--- live\n+++ file\n l1\n-l2\n+l2x\n l3\n l4\n l5\n@@\n l8\n l9\n l10\n-l11\n l12\n"
        );
    }

    #[test]
    fn a_new_document_is_all_additions() {
        assert_eq!(
            render("", "kind: Service\nname: a\n", "live (none)", "f"),
            "--- live (none)\n+++ f\n+kind: Service\n+name: a\n"
        );
    }
}
