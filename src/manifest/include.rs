//! Reading manifest files and merging `include:`d ones under them.
//!
//! Included files come first, in order, then the including file is merged
//! over them: mappings merge key by key, scalars and lists replace. A file
//! that two includes share (`tiny-online.yaml` includes `cai-online.yaml`
//! and `tiny-sl.yaml`, both of which include `cai-sl.yaml`) is merged once,
//! where it first comes, so the second include does not undo what the
//! first overrode in it. The location index is merged alongside, so every
//! value keeps pointing into the file that wrote it.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use super::locate::{KeyPath, Locs};
use super::{Location, ManifestError};

/// A merged manifest tree and where each of its parts was written.
pub(crate) struct Merged {
    pub value: Value,
    pub locs: Locs,
}

/// Loads `file` and, recursively, what it includes.
pub(crate) fn load_tree(file: &Path) -> Result<Merged, ManifestError> {
    let root_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut chain = Vec::new();
    load_file(file, None, &root_dir, &mut chain, &mut HashSet::new())
}

/// `via`: the include entry that named this file (for errors); `chain`:
/// the files including it, for cycles; `merged`: every file merged so far.
fn load_file(
    file: &Path,
    via: Option<&Location>,
    root_dir: &Path,
    chain: &mut Vec<(PathBuf, PathBuf)>,
    merged: &mut HashSet<PathBuf>,
) -> Result<Merged, ManifestError> {
    let read_error = |message: String| ManifestError {
        location: via.cloned(),
        file: via.map_or_else(|| file.to_path_buf(), |l| l.file.clone()),
        stage: None,
        field: via.map(|_| "include".to_string()),
        message,
        suggestion: None,
    };
    let canonical = file
        .canonicalize()
        .map_err(|e| read_error(format!("cannot read `{}`: {e}", file.display())))?;
    if let Some(pos) = chain.iter().position(|(c, _)| *c == canonical) {
        let show = |p: &Path| p.strip_prefix(root_dir).unwrap_or(p).display().to_string();
        let mut names: Vec<String> = chain[pos..].iter().map(|(_, shown)| show(shown)).collect();
        names.push(show(file));
        return Err(read_error(format!("include cycle: {}", names.join(" -> "))));
    }
    if !merged.insert(canonical.clone()) {
        return Ok(Merged {
            value: Value::Mapping(Mapping::new()),
            locs: Locs::default(),
        });
    }
    let bytes = std::fs::read(file)
        .map_err(|e| read_error(format!("cannot read `{}`: {e}", file.display())))?;
    let text = String::from_utf8(bytes).map_err(|e| not_utf8(file, &e))?;

    let invalid = |(location, message): (Location, String)| ManifestError {
        file: location.file.clone(),
        location: Some(location),
        stage: None,
        field: None,
        message: format!("invalid YAML: {message}"),
        suggestion: None,
    };
    let mut value: Value = serde_yaml::from_str(&text).map_err(|e| {
        // serde_yaml places a duplicate key at its mapping; the index
        // finds the key itself.
        match Locs::index(file, &text) {
            Err(found) if found.1.starts_with("duplicate key") => invalid(found),
            _ => syntax_error(file, &e),
        }
    })?;
    let locs = Locs::index(file, &text).map_err(invalid)?;
    let root_loc = locs.nearest(&[]).value.clone();
    let err_at = |location: Location, field: &str, message: String| ManifestError {
        file: location.file.clone(),
        location: Some(location),
        stage: None,
        field: Some(field.to_string()),
        message,
        suggestion: None,
    };
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }
    let Value::Mapping(map) = &mut value else {
        return Err(ManifestError {
            file: file.to_path_buf(),
            location: Some(root_loc),
            stage: None,
            field: None,
            message: "a manifest must be a mapping".into(),
            suggestion: None,
        });
    };

    // The include list, with the location of each entry.
    let includes: Vec<(String, Location)> = match map.remove("include") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![(s, locs.nearest(&kp(&["include"])).value.clone())],
        Some(Value::Sequence(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let loc = locs
                    .nearest(&kp(&["include", &i.to_string()]))
                    .value
                    .clone();
                match item {
                    Value::String(s) => out.push((s, loc)),
                    _ => {
                        return Err(err_at(
                            loc,
                            "include",
                            "an include must be a file path".into(),
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            let loc = locs.nearest(&kp(&["include"])).value.clone();
            return Err(err_at(
                loc,
                "include",
                "`include` must be a path or a list of paths".into(),
            ));
        }
    };

    let dir = file.parent().unwrap_or(Path::new(""));
    chain.push((canonical, file.to_path_buf()));
    let mut out = Merged {
        value: Value::Mapping(Mapping::new()),
        locs: Locs::default(),
    };
    out.locs.take_spot(&[], &locs);
    for (written, loc) in &includes {
        let included = load_file(&dir.join(written), Some(loc), root_dir, chain, merged)?;
        merge(&mut out, included.value, &included.locs, &mut Vec::new());
    }
    chain.pop();
    merge(&mut out, value, &locs, &mut Vec::new());
    Ok(out)
}

/// Deep-merges `over` (indexed by `over_locs`) into `base` at `at`.
fn merge(base: &mut Merged, over: Value, over_locs: &Locs, at: &mut KeyPath) {
    let Value::Mapping(over) = over else {
        unreachable!("merge starts at the root mapping")
    };
    for (k, v) in over {
        at.push(key_text(&k));
        let target = lookup_mut(&mut base.value, &at[..at.len() - 1]).expect("parent is a mapping");
        let both_maps = v.is_mapping() && target.get(&k).is_some_and(Value::is_mapping);
        // A stage given another op is another stage: the base's params and
        // inputs were the other op's, and merged in they would be errors
        // pointing into the included file.
        let new_op = at.len() == 2
            && at[0] == "stages"
            && v.get("op")
                .is_some_and(|op| target.get(&k).and_then(|old| old.get("op")) != Some(op));
        if both_maps && !new_op {
            base.locs.take_spot(at, over_locs);
            merge(base, v, over_locs, at);
        } else {
            target.insert(k, v);
            base.locs.replace_subtree(at, over_locs);
        }
        at.pop();
    }
}

fn lookup_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Mapping> {
    let mut cur = value;
    for k in path {
        cur = cur.as_mapping_mut()?.get_mut(k.as_str())?;
    }
    cur.as_mapping_mut()
}

/// A mapping key as it appears in key paths.
pub(crate) fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "~".into(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim_end()
            .to_string(),
    }
}

pub(crate) fn kp(parts: &[&str]) -> KeyPath {
    parts.iter().map(|s| s.to_string()).collect()
}

/// A manifest that is not UTF-8, located at its first bad byte.
fn not_utf8(file: &Path, e: &std::string::FromUtf8Error) -> ManifestError {
    let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
    let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
    let bad = e.as_bytes()[good.len()];
    ManifestError {
        file: file.to_path_buf(),
        location: Some(Location {
            file: file.to_path_buf(),
            line,
            column,
        }),
        stage: None,
        field: None,
        message: format!(
            "not UTF-8: byte 0x{bad:02X} (manifests are UTF-8 text; re-save it as UTF-8)"
        ),
        suggestion: None,
    }
}

fn syntax_error(file: &Path, e: &serde_yaml::Error) -> ManifestError {
    let location = e.location().map_or(
        Location {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
        },
        |l| Location {
            file: file.to_path_buf(),
            line: l.line(),
            column: l.column(),
        },
    );
    // serde_yaml repeats the position in its message; the prefix has it.
    let message = e.to_string();
    let message = match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    ManifestError {
        file: file.to_path_buf(),
        location: Some(location),
        stage: None,
        field: None,
        message: format!("invalid YAML: {message}"),
        suggestion: None,
    }
}
