//! Who uses a stored object: the trees that list a blob, the records that
//! produced it (an output) and the records built on it (an input, directly
//! or through a downstream stage that consumed their outputs). `verify`
//! names them; `verify --repair` removes the records.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::records::StageRecord;
use super::{ArtifactId, ArtifactKind, Damage};

/// The store's usage, read from every listing and record.
#[derive(Default)]
pub(super) struct Dependents {
    /// Blob hash -> hashes of the trees that list it.
    trees_of_blob: BTreeMap<String, BTreeSet<String>>,
    /// Every readable record, with its file.
    records: Vec<(PathBuf, StageRecord)>,
}

/// One use of an object, for `verify`'s report.
pub enum Use<'a> {
    /// A tree lists the blob.
    InTree(&'a str),
    /// A record's output is the object (or a tree that holds it).
    OutputOf {
        record: &'a (PathBuf, StageRecord),
        output: &'a str,
    },
    /// A record's input is the object (or a tree that holds it).
    InputOf {
        record: &'a (PathBuf, StageRecord),
        input: &'a str,
    },
}

impl Dependents {
    pub fn add_listing(&mut self, tree: &str, entries: &[(String, String)]) {
        for (_, blob) in entries {
            self.trees_of_blob
                .entry(blob.clone())
                .or_default()
                .insert(tree.to_string());
        }
    }

    pub fn add_record(&mut self, path: PathBuf, record: StageRecord) {
        self.records.push((path, record));
    }

    /// The trees that list blob `hash`.
    pub fn trees_of(&self, hash: &str) -> impl Iterator<Item = &str> {
        self.trees_of_blob
            .get(hash)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// The object `id` and, for a blob, every tree that holds it: the ids a
    /// record may name it by.
    fn ids_holding(&self, id: &ArtifactId) -> BTreeSet<ArtifactId> {
        let mut ids = BTreeSet::from([id.clone()]);
        if id.kind == ArtifactKind::File {
            ids.extend(self.trees_of(&id.hash).map(|t| ArtifactId {
                kind: ArtifactKind::Tree,
                hash: t.to_string(),
            }));
        }
        ids
    }

    /// Every use of `id`: trees, then producing records, then consuming ones.
    pub fn uses(&self, id: &ArtifactId) -> Vec<Use<'_>> {
        let mut uses = Vec::new();
        if id.kind == ArtifactKind::File {
            uses.extend(self.trees_of(&id.hash).map(Use::InTree));
        }
        let holding = self.ids_holding(id);
        for record in &self.records {
            for (output, out_id) in &record.1.outputs {
                if holding.contains(out_id) {
                    uses.push(Use::OutputOf { record, output });
                }
            }
        }
        for record in &self.records {
            for (input, in_id) in &record.1.key.inputs {
                if holding.contains(in_id) {
                    uses.push(Use::InputOf { record, input });
                }
            }
        }
        uses
    }

    /// The records to remove for `damage`: those that produced a damaged
    /// object (their outputs are quarantined) and every record built on one,
    /// directly or downstream (their results may have been computed from
    /// corrupt bytes). Sorted by path.
    pub fn records_to_remove(&self, damage: &Damage) -> Vec<&(PathBuf, StageRecord)> {
        let mut damaged: BTreeSet<ArtifactId> = BTreeSet::new();
        for id in damage.ids() {
            damaged.extend(self.ids_holding(&id));
        }
        let mut remove: BTreeSet<usize> = BTreeSet::new();
        // Producers: removed, but their other outputs are sound, so their
        // consumers stay unless they read a damaged object.
        for (i, (_, r)) in self.records.iter().enumerate() {
            if r.outputs.values().any(|o| damaged.contains(o)) {
                remove.insert(i);
            }
        }
        // Consumers, to a fixed point: a record built on a damaged object
        // taints its own outputs for the records downstream.
        let mut tainted = damaged;
        loop {
            let mut grew = false;
            for (i, (_, r)) in self.records.iter().enumerate() {
                if r.key.inputs.values().any(|id| tainted.contains(id)) {
                    remove.insert(i);
                    for out in r.outputs.values() {
                        grew |= tainted.insert(out.clone());
                    }
                }
            }
            if !grew {
                break;
            }
        }
        remove.into_iter().map(|i| &self.records[i]).collect()
    }
}
