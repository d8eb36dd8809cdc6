//! Source positions of manifest keys and values.
//!
//! serde_yaml's `Value` forgets where things were written, so each file is
//! parsed a second time with yaml_rust2's event parser, whose markers give
//! positions; the result is an index from key paths
//! (`["stages", "sft", "params", "lr"]`, list items by index) to the key's
//! and the value's [`Location`]. Merging includes merges these indexes the
//! same way as the values, so a location always points into the file that
//! defined the value.
use std::collections::BTreeMap;
use std::path::Path;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::Location;

/// A key path: mapping keys and list indexes, as text.
pub(crate) type KeyPath = Vec<String>;

/// Where a node was written: its key (the item itself, for list items and
/// the root) and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spot {
    pub key: Location,
    pub value: Location,
}

/// Key path to position, for one file or for a merged manifest.
#[derive(Debug, Clone, Default)]
pub(crate) struct Locs {
    spots: BTreeMap<KeyPath, Spot>,
}

impl Locs {
    /// Indexes `text` (the contents of `file`). Fails only on YAML that
    /// serde_yaml accepted and yaml_rust2 did not; the error is located.
    pub fn index(file: &Path, text: &str) -> Result<Locs, (Location, String)> {
        let mut builder = Builder {
            file,
            locs: Locs::default(),
            stack: Vec::new(),
            duplicate: None,
        };
        let root = Location {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
        };
        builder.locs.spots.insert(
            Vec::new(),
            Spot {
                key: root.clone(),
                value: root,
            },
        );
        let mut parser = Parser::new_from_str(text);
        parser
            .load(&mut builder, false)
            .map_err(|e| (location(file, e.marker()), e.info().to_string()))?;
        if let Some((path, first, again)) = builder.duplicate {
            let (key, parent) = path.split_last().expect("a key path has its key");
            let within = match parent {
                [] => String::new(),
                p => format!(" in `{}`", p.join(".")),
            };
            let message = format!(
                "duplicate key `{key}`{within} (first at line {})",
                first.line
            );
            return Err((again, message));
        }
        Ok(builder.locs)
    }

    pub fn get(&self, path: &[String]) -> Option<&Spot> {
        self.spots.get(path)
    }

    /// The spot of `path` or of its nearest indexed ancestor.
    pub fn nearest(&self, path: &[String]) -> &Spot {
        (0..=path.len())
            .rev()
            .find_map(|n| self.spots.get(&path[..n]))
            .expect("the root is always indexed")
    }

    /// Replaces everything at and below `path` with `other`'s entries there.
    pub fn replace_subtree(&mut self, path: &[String], other: &Locs) {
        let doomed: Vec<KeyPath> = self.under(path).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.spots.remove(&k);
        }
        for (k, v) in other.under(path) {
            self.spots.insert(k.clone(), v.clone());
        }
    }

    /// Takes `other`'s spot for `path` itself (a merged mapping's key).
    pub fn take_spot(&mut self, path: &[String], other: &Locs) {
        if let Some(spot) = other.spots.get(path) {
            self.spots.insert(path.to_vec(), spot.clone());
        }
    }

    /// Entries at and below `path` (contiguous in key order).
    fn under<'a>(
        &'a self,
        path: &'a [String],
    ) -> impl Iterator<Item = (&'a KeyPath, &'a Spot)> + 'a {
        self.spots
            .range(path.to_vec()..)
            .take_while(move |(k, _)| k.starts_with(path))
    }
}

fn location(file: &Path, mark: &Marker) -> Location {
    // yaml_rust2 0.10 markers: line 1-based, column 0-based.
    Location {
        file: file.to_path_buf(),
        line: mark.line(),
        column: mark.col() + 1,
    }
}

enum Frame {
    /// A mapping at `path`; `key` is the pending key once read.
    Map {
        path: KeyPath,
        key: Option<String>,
    },
    Seq {
        path: KeyPath,
        next: usize,
    },
    /// A complex (non-scalar) mapping key: skipped.
    Skip {
        depth: usize,
    },
}

struct Builder<'a> {
    file: &'a Path,
    locs: Locs,
    stack: Vec<Frame>,
    /// The first key written twice in one mapping: its path, where it was
    /// first written and where again.
    duplicate: Option<(KeyPath, Location, Location)>,
}

impl Builder<'_> {
    /// Where the next node goes: `Some(path, key location)` or `None` when it
    /// is a mapping key (recorded by the caller) or inside a skipped key.
    fn place(&mut self, loc: &Location) -> Option<(KeyPath, Option<Location>)> {
        match self.stack.last_mut() {
            None => Some((Vec::new(), None)),
            Some(Frame::Map { path, key }) => {
                let k = key.take()?;
                let mut p = path.clone();
                p.push(k);
                let key_loc = self.locs.spots.get(&p).map(|s| s.key.clone());
                Some((p, key_loc.or_else(|| Some(loc.clone()))))
            }
            Some(Frame::Seq { path, next }) => {
                let mut p = path.clone();
                p.push(next.to_string());
                *next += 1;
                Some((p, None))
            }
            Some(Frame::Skip { .. }) => None,
        }
    }

    fn record(&mut self, path: KeyPath, key: Option<Location>, value: Location) {
        let key = key.unwrap_or_else(|| value.clone());
        self.locs.spots.insert(path, Spot { key, value });
    }

    fn node(&mut self, ev: &Event, loc: Location) {
        if let Some(Frame::Skip { depth }) = self.stack.last_mut() {
            match ev {
                Event::MappingStart(..) | Event::SequenceStart(..) => *depth += 1,
                Event::MappingEnd | Event::SequenceEnd => {
                    *depth -= 1;
                    if *depth == 0 {
                        self.stack.pop();
                        // The skipped key is consumed: its value goes nowhere.
                        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                            *key = Some("?".into());
                        }
                    }
                }
                _ => {}
            }
            return;
        }
        // A mapping waiting for a key.
        if let Some(Frame::Map {
            path,
            key: key @ None,
        }) = self.stack.last_mut()
        {
            match ev {
                Event::Scalar(text, ..) => {
                    let parent = path.clone();
                    let mut p = path.clone();
                    p.push(text.clone());
                    *key = Some(text.clone());
                    if let Some(first) = self.locs.spots.get(&p) {
                        if self.duplicate.is_none() {
                            self.duplicate = Some((p.clone(), first.key.clone(), loc.clone()));
                        }
                    }
                    // A block mapping's start marker sits after its first
                    // key: the mapping's value starts at that key instead.
                    if let Some(spot) = self.locs.spots.get_mut(&parent) {
                        if (loc.line, loc.column) < (spot.value.line, spot.value.column) {
                            spot.value = loc.clone();
                            if parent.is_empty() {
                                spot.key = loc.clone();
                            }
                        }
                    }
                    self.record(p, Some(loc.clone()), loc);
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    self.stack.push(Frame::Skip { depth: 1 })
                }
                Event::MappingEnd => {
                    self.stack.pop();
                }
                _ => *key = Some("?".into()),
            }
            return;
        }
        match ev {
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::MappingStart(..)
            | Event::SequenceStart(..) => {
                let Some((path, key)) = self.place(&loc) else {
                    return;
                };
                self.record(path.clone(), key, loc);
                match ev {
                    Event::MappingStart(..) => self.stack.push(Frame::Map { path, key: None }),
                    Event::SequenceStart(..) => self.stack.push(Frame::Seq { path, next: 0 }),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let loc = location(self.file, &mark);
        self.node(&ev, loc);
    }
}
