//! The applied policy documents, and what a change to them would do.
//!
//! Two ways in, one at a time: `sinewctl apply` (the admin API), or the `--policy` files. A
//! control plane started with `--policy` takes its whole policy from the files (GitOps: the
//! admin API refuses to apply or delete, see `mesh`), so a document missing from the files
//! is removed from the mesh whichever way it came in. A change is first planned against the
//! current set (pure code, no I/O), then persisted, then committed to memory, so a failed
//! write changes nothing.

use sinew_proto::policy::{Document, Kind, Spec};
use std::collections::{BTreeMap, BTreeSet};

/// The store key of a document: `Service/orders`.
pub fn key(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// One applied document.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEntry {
    pub document: Document,
    /// The spec's canonical JSON, as sent to sidecars (computed once, here).
    pub json: String,
    /// Loaded from the `--policy` files (rather than applied through the admin API).
    pub from_file: bool,
}

impl PolicyEntry {
    pub fn new(document: Document, from_file: bool) -> Self {
        let json = document.spec.to_json();
        PolicyEntry {
            document,
            json,
            from_file,
        }
    }
}

/// What applying a document did to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Changed,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Changed => "changed",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// Per input document: its kind, name and outcome.
pub type Outcomes = Vec<(Kind, String, Outcome)>;

/// A planned change: what to write, what to delete, and per input document its outcome.
#[derive(Debug, Default)]
pub struct Change {
    pub upserts: Vec<(String, PolicyEntry)>,
    pub deletes: Vec<String>,
    pub outcomes: Outcomes,
}

impl Change {
    /// Whether the mesh's policy changes (a new config version), as opposed to only
    /// bookkeeping such as which way a document came in.
    pub fn changes_policy(&self) -> bool {
        !self.deletes.is_empty()
            || self
                .outcomes
                .iter()
                .any(|(_, _, o)| *o != Outcome::Unchanged)
    }

    /// Whether anything needs writing at all.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    entries: BTreeMap<String, PolicyEntry>,
}

impl PolicySet {
    pub fn from_entries(entries: impl IntoIterator<Item = PolicyEntry>) -> Self {
        PolicySet {
            entries: entries
                .into_iter()
                .map(|e| (key(e.document.kind, &e.document.name), e))
                .collect(),
        }
    }

    /// Applying `docs` through the admin API: upsert each.
    pub fn plan_apply(&self, docs: Vec<Document>) -> Change {
        self.plan_upserts(docs, false)
    }

    /// The `--policy` files now hold exactly `docs`, and they are the whole policy: upsert
    /// them and delete every other document (one applied by hand before the control plane
    /// was started with `--policy` included).
    pub fn plan_file_sync(&self, docs: Vec<Document>) -> Change {
        let mut change = self.plan_upserts(docs, true);
        let kept: BTreeSet<String> = change
            .outcomes
            .iter()
            .map(|(kind, name, _)| key(*kind, name))
            .collect();
        change.deletes = self
            .entries
            .keys()
            .filter(|k| !kept.contains(*k))
            .cloned()
            .collect();
        change
    }

    /// Every reference in `docs` to a service that has neither policy (here or in `docs`)
    /// nor a live instance (`live`): `allow`, `calls` and a subscription's `service`. Such a
    /// reference is valid (the service may come later) but is usually a typo: an `allow`
    /// typo locks the real caller out, a subscription to nobody dead-letters every event
    /// after its retries. One line per reference, naming the document and the field.
    pub fn dangling_references(&self, docs: &[Document], live: &BTreeSet<String>) -> Vec<String> {
        let known = |name: &str| {
            live.contains(name)
                || self.get(Kind::Service, name).is_some()
                || docs
                    .iter()
                    .any(|d| d.kind == Kind::Service && d.name == name)
        };
        let mut warnings = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            let mut check = |path: String, name: &str| {
                if !known(name) {
                    warnings.push(format!(
                        "document {} ({} {}): {path}: service `{name}` has no policy and no instances (a typo?)",
                        i + 1,
                        doc.kind,
                        doc.name
                    ));
                }
            };
            match &doc.spec {
                Spec::Service(spec) => {
                    for (j, name) in spec.allow.iter().enumerate() {
                        check(format!("spec.allow[{j}]"), name);
                    }
                    for (j, name) in spec.calls.iter().flatten().enumerate() {
                        check(format!("spec.calls[{j}]"), name);
                    }
                }
                Spec::Subscription(spec) => check("spec.service".into(), &spec.service),
            }
        }
        warnings
    }

    /// Deleting one document; `None` if there is no such document.
    pub fn plan_delete(&self, kind: Kind, name: &str) -> Option<Change> {
        let k = key(kind, name);
        self.entries.contains_key(&k).then(|| Change {
            deletes: vec![k],
            ..Change::default()
        })
    }

    fn plan_upserts(&self, docs: Vec<Document>, from_file: bool) -> Change {
        let mut change = Change::default();
        for document in docs {
            let k = key(document.kind, &document.name);
            let outcome = match self.entries.get(&k) {
                None => Outcome::Created,
                Some(old) if old.document == document => Outcome::Unchanged,
                Some(_) => Outcome::Changed,
            };
            let origin_changes = self
                .entries
                .get(&k)
                .is_some_and(|old| old.from_file != from_file);
            change
                .outcomes
                .push((document.kind, document.name.clone(), outcome));
            if outcome != Outcome::Unchanged || origin_changes {
                change
                    .upserts
                    .push((k, PolicyEntry::new(document, from_file)));
            }
        }
        change
    }

    /// Makes a planned (and persisted) change real.
    pub fn commit(&mut self, change: &Change) {
        for k in &change.deletes {
            self.entries.remove(k);
        }
        for (k, entry) in &change.upserts {
            self.entries.insert(k.clone(), entry.clone());
        }
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&PolicyEntry> {
        self.entries.get(&key(kind, name))
    }

    /// Every document of a kind, by name.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &PolicyEntry> {
        self.entries
            .values()
            .filter(move |e| e.document.kind == kind)
    }

    /// Every document, by kind then name.
    pub fn all(&self) -> impl Iterator<Item = &PolicyEntry> {
        self.entries.values()
    }

    /// The `kind: Service` documents, by service name.
    pub fn services(&self) -> impl Iterator<Item = (&str, &PolicyEntry)> {
        self.of_kind(Kind::Service)
            .map(|e| (e.document.name.as_str(), e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sinew_proto::policy::parse_documents;

    fn docs(yaml: &str) -> Vec<Document> {
        parse_documents(yaml).unwrap()
    }

    fn outcomes(change: &Change) -> Vec<&'static str> {
        change.outcomes.iter().map(|(_, _, o)| o.as_str()).collect()
    }

    #[test]
    fn apply_reports_created_changed_unchanged() {
        let mut set = PolicySet::default();
        let c = set.plan_apply(docs(
            "kind: Service\nname: a\n---\nkind: Service\nname: b\n",
        ));
        assert_eq!(outcomes(&c), ["created", "created"]);
        assert!(c.changes_policy());
        set.commit(&c);

        let c = set.plan_apply(docs(
            "kind: Service\nname: a\n---\nkind: Service\nname: b\nspec: {timeout: 2s}\n",
        ));
        assert_eq!(outcomes(&c), ["unchanged", "changed"]);
        assert_eq!(c.upserts.len(), 1);
        set.commit(&c);
        assert_eq!(
            set.get(Kind::Service, "b")
                .unwrap()
                .document
                .spec
                .service()
                .unwrap()
                .timeout
                .as_secs(),
            2
        );

        let c = set.plan_apply(docs("kind: Service\nname: a\n"));
        assert!(!c.changes_policy() && c.is_empty());
    }

    #[test]
    fn file_sync_makes_the_files_the_whole_policy() {
        let mut set = PolicySet::default();
        // Applied by hand before the control plane was started with `--policy`.
        set.commit(&set.plan_apply(docs("kind: Service\nname: m\n")));
        let c = set.plan_file_sync(docs(
            "kind: Service\nname: a\n---\nkind: Service\nname: f\n",
        ));
        assert_eq!(c.deletes, vec!["Service/m".to_string()]);
        set.commit(&c);

        let c = set.plan_file_sync(docs("kind: Service\nname: a\n"));
        assert_eq!(c.deletes, vec!["Service/f".to_string()]);
        assert!(c.changes_policy());
        set.commit(&c);
        let names: Vec<&str> = set.services().map(|(n, _)| n).collect();
        assert_eq!(names, ["a"]);
        assert!(
            set.plan_file_sync(docs("kind: Service\nname: a\n"))
                .is_empty()
        );
    }

    #[test]
    fn references_to_unknown_services_are_named_with_their_field() {
        let mut set = PolicySet::default();
        set.commit(&set.plan_apply(docs("kind: Service\nname: orders\n")));
        let live = BTreeSet::from(["web".to_string()]);
        let input = docs(
            "kind: Service\nname: billing\nspec: {allow: [web, webb], calls: [orders, ghost]}\n---\n\
             kind: Subscription\nname: s\nspec: {topic: t, service: billing}\n---\n\
             kind: Subscription\nname: g\nspec: {topic: t, service: ghost}\n",
        );
        assert_eq!(
            set.dangling_references(&input, &live),
            [
                "document 1 (Service billing): spec.allow[1]: service `webb` has no policy and no instances (a typo?)",
                "document 1 (Service billing): spec.calls[1]: service `ghost` has no policy and no instances (a typo?)",
                "document 3 (Subscription g): spec.service: service `ghost` has no policy and no instances (a typo?)",
            ]
        );
        assert!(
            set.dangling_references(
                &docs("kind: Service\nname: a\nspec: {allow: [orders, web, a]}\n"),
                &live
            )
            .is_empty()
        );
    }

    #[test]
    fn delete_needs_an_existing_document() {
        let mut set = PolicySet::default();
        assert!(set.plan_delete(Kind::Service, "a").is_none());
        set.commit(&set.plan_apply(docs("kind: Service\nname: a\n")));
        let c = set.plan_delete(Kind::Service, "a").unwrap();
        set.commit(&c);
        assert!(set.get(Kind::Service, "a").is_none());
    }
}
