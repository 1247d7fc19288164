//! The applied policy documents, and what a change to them would do.
//!
//! Two ways in: `sinewctl apply` (the admin API) and the `--policy` files. A change is first
//! planned against the current set (pure code, no I/O), then persisted, then committed to
//! memory, so a failed write changes nothing. The set remembers which documents came from
//! files, so a document removed from the files is removed from the mesh, while documents
//! applied by hand are left alone.

use sinew_proto::policy::{Document, Kind};
use std::collections::BTreeMap;

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

    /// The `--policy` files now hold exactly `docs`: upsert them and delete the documents that
    /// came from the files before and are no longer in them.
    pub fn plan_file_sync(&self, docs: Vec<Document>) -> Change {
        let mut change = self.plan_upserts(docs, true);
        let kept: Vec<String> = change
            .outcomes
            .iter()
            .map(|(kind, name, _)| key(*kind, name))
            .collect();
        change.deletes = self
            .entries
            .iter()
            .filter(|(k, e)| e.from_file && !kept.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        change
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
    fn file_sync_deletes_only_what_came_from_files() {
        let mut set = PolicySet::default();
        set.commit(&set.plan_file_sync(docs(
            "kind: Service\nname: a\n---\nkind: Service\nname: f\n",
        )));
        set.commit(&set.plan_apply(docs("kind: Service\nname: m\n")));

        let c = set.plan_file_sync(docs("kind: Service\nname: a\n"));
        assert_eq!(c.deletes, vec!["Service/f".to_string()]);
        assert!(c.changes_policy());
        set.commit(&c);
        let names: Vec<&str> = set.services().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "m"]);
    }

    #[test]
    fn applying_a_file_document_by_hand_takes_it_over() {
        let mut set = PolicySet::default();
        set.commit(&set.plan_file_sync(docs("kind: Service\nname: a\n")));
        let c = set.plan_apply(docs("kind: Service\nname: a\n"));
        assert!(!c.changes_policy(), "same content");
        assert_eq!(c.upserts.len(), 1, "origin is rewritten");
        set.commit(&c);
        assert!(set.plan_file_sync(Vec::new()).deletes.is_empty());
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
