//! From a merged manifest tree to a resolved [`Pipeline`]: structure checks,
//! `--set`, matrix expansion, loop unrolling, interpolation, input binding
//! and op validation. Every error is located through the merged [`Locs`].
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use super::include::{self, key_text, kp};
use super::interp::{self, Piece};
use super::locate::{KeyPath, Locs};
use super::loops::{self, LoopError, Loops};
use super::schema::{Manifest, StageDef};
use super::{Input, LoadOptions, Location, LoopRound, ManifestError, Pipeline, Stage};
use crate::ops::{nearest, OpDecl, ParamError};

const TOP_KEYS: &[&str] = &[
    "version", "name", "seed", "include", "params", "loops", "stages", "tracking",
];
const STAGE_KEYS: &[&str] = &[
    "op",
    "inputs",
    "params",
    "outputs",
    "matrix",
    "device",
    "description",
    "keep_checkpoints",
    "resources",
];

/// [`super::load`] with the op lookup as a parameter (tests add their own ops).
pub(crate) fn load_with(
    path: &Path,
    options: &LoadOptions,
    ops: &[&OpDecl],
) -> Result<Pipeline, ManifestError> {
    let merged = include::load_tree(path)?;
    let cx = Cx {
        locs: merged.locs,
        ops,
    };
    let mut tree = merged.value;
    cx.check_structure(&mut tree)?;
    let declared = |section: &str| -> Vec<String> {
        tree.get(section)
            .and_then(Yaml::as_mapping)
            .map(|m| m.keys().map(key_text).collect())
            .unwrap_or_default()
    };
    let order = declared("stages");
    let loop_order = declared("loops");
    let manifest = cx.deserialize(tree)?;
    cx.check_header(&manifest)?;

    let mut params = manifest.params.clone();
    for (key, value) in &options.sets {
        cx.apply_set(&mut params, key, value)?;
    }
    cx.unescape_params(&mut params, &options.sets)?;

    let keys = cx.stage_ops(&manifest, &order)?;
    let loops = Loops::new(&manifest, &loop_order, &params, |key| {
        keys.get(key).map(|(_, _, outputs)| outputs.as_slice())
    })
    .map_err(|e| cx.loop_error(e))?;
    let expanded = cx.expand_stages(&manifest, &order, keys, &loops)?;
    let world = World {
        insts: &expanded.insts,
        by_key: &expanded.by_key,
        keys: &expanded.keys,
        loops: &loops,
        params: &params,
        sets: &options.sets,
    };
    cx.check_inits(&world, &manifest)?;
    let stages = expanded
        .insts
        .iter()
        .map(|inst| cx.resolve_instance(&world, inst))
        .collect::<Result<Vec<Stage>, ManifestError>>()?;

    let file = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut tracking = manifest.tracking;
    tracking.tensorboard = tracking.tensorboard.map(|d| dir.join(d));
    Ok(Pipeline {
        tracking,
        name: manifest.name,
        file,
        dir,
        seed: manifest.seed,
        params,
        stages,
    })
}

/// `stages.KEY` of the instance's stage, then `rest`.
fn stage_path(inst: &Inst, rest: &[&str]) -> KeyPath {
    let mut p = kp(&["stages", &inst.key]);
    p.extend(rest.iter().map(|s| s.to_string()));
    p
}

/// One matrix instance, one round of a loop's stage, or a plain stage
/// (empty matrix, no round).
struct Inst {
    id: String,
    key: String,
    matrix: BTreeMap<String, Json>,
    round: Option<u64>,
}

/// Each stage key's op, definition and output names.
type StageOps<'m> = BTreeMap<&'m str, (&'m OpDecl, &'m StageDef, Vec<String>)>;

/// Pass 1 over the stages: each stage's op, outputs and instances.
struct Expanded<'m> {
    insts: Vec<Inst>,
    /// Instances of each stage key, as indices into `insts`.
    by_key: HashMap<&'m str, Vec<usize>>,
    keys: StageOps<'m>,
}

/// What reference resolution looks at.
struct World<'a> {
    insts: &'a [Inst],
    by_key: &'a HashMap<&'a str, Vec<usize>>,
    keys: &'a StageOps<'a>,
    loops: &'a Loops,
    params: &'a BTreeMap<String, Json>,
    /// `--set` overrides, as (`params.NAME`, `VALUE`).
    sets: &'a [(String, String)],
}

struct Cx<'a> {
    locs: Locs,
    ops: &'a [&'a OpDecl],
}

impl<'a> Cx<'a> {
    fn error(
        &self,
        location: Location,
        stage: Option<&str>,
        field: Option<&str>,
        message: String,
        suggestion: Option<String>,
    ) -> ManifestError {
        ManifestError {
            file: location.file.clone(),
            location: Some(location),
            stage: stage.map(str::to_string),
            field: field.map(str::to_string),
            message,
            suggestion,
        }
    }

    /// The typed manifest, with a deserialisation error located at the
    /// value it names.
    fn deserialize(&self, tree: Yaml) -> Result<Manifest, ManifestError> {
        serde_path_to_error::deserialize(tree).map_err(|e| {
            let at: KeyPath = e
                .path()
                .iter()
                .filter_map(|seg| match seg {
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                    _ => None,
                })
                .collect();
            let (stage, field) = split_field(&at);
            self.error(
                self.value_at(&at),
                stage.as_deref(),
                field.as_deref(),
                e.inner().to_string(),
                None,
            )
        })
    }

    /// The manifest version and the pipeline name.
    fn check_header(&self, manifest: &Manifest) -> Result<(), ManifestError> {
        if manifest.version != 1 {
            let msg = format!(
                "unsupported manifest version {} (this alignflow reads version 1)",
                manifest.version
            );
            return Err(self.error(
                self.value_at(&kp(&["version"])),
                None,
                Some("version"),
                msg,
                None,
            ));
        }
        if manifest.name.is_empty() || manifest.name.contains('/') {
            let msg = "the pipeline name must be non-empty and contain no `/`".to_string();
            return Err(self.error(self.value_at(&kp(&["name"])), None, Some("name"), msg, None));
        }
        Ok(())
    }

    /// The op and outputs of every stage, in declaration `order`.
    fn stage_ops<'m>(
        &'m self,
        manifest: &'m Manifest,
        order: &'m [String],
    ) -> Result<StageOps<'m>, ManifestError> {
        let mut keys = BTreeMap::new();
        for key in order {
            let def = &manifest.stages[key];
            let op = self.op(key, def)?;
            let outputs = self.outputs(key, def, op)?;
            keys.insert(key.as_str(), (op, def, outputs));
        }
        Ok(keys)
    }

    /// Pass 1: the instances of every stage, in declaration `order`; a
    /// loop's, round by round, where its first stage is declared.
    fn expand_stages<'m>(
        &'m self,
        manifest: &'m Manifest,
        order: &'m [String],
        keys: StageOps<'m>,
        loops: &'m Loops,
    ) -> Result<Expanded<'m>, ManifestError> {
        let mut insts: Vec<Inst> = Vec::new();
        let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut unrolled: BTreeSet<&str> = BTreeSet::new();
        for key in order {
            if let Some(l) = loops.of(key) {
                if !unrolled.insert(&l.name) {
                    continue;
                }
                for round in 1..=l.rounds {
                    for key in &l.stages {
                        let coords = BTreeMap::from([("round".to_string(), Json::from(round))]);
                        by_key.entry(key).or_default().push(insts.len());
                        insts.push(Inst {
                            id: instance_id(key, &coords),
                            key: key.clone(),
                            matrix: BTreeMap::new(),
                            round: Some(round),
                        });
                    }
                }
                continue;
            }
            for matrix in self.expand(key, &manifest.stages[key])? {
                let id = instance_id(key, &matrix);
                by_key.entry(key).or_default().push(insts.len());
                insts.push(Inst {
                    id,
                    key: key.clone(),
                    matrix,
                    round: None,
                });
            }
        }
        self.check_unique_ids(&insts)?;
        Ok(Expanded {
            insts,
            by_key,
            keys,
        })
    }

    /// Every instance has its own id: matrix values that print alike (`1`
    /// and `"1"`), or a stage named as another's instance (`a[n=1]`,
    /// `b[round=1]`), would make two stages one id, which a reference, the
    /// lockfile, `--target` and the seed all take for one.
    fn check_unique_ids(&self, insts: &[Inst]) -> Result<(), ManifestError> {
        let mut first: HashMap<&str, &Inst> = HashMap::new();
        for inst in insts {
            let Some(other) = first.insert(&inst.id, inst) else {
                continue;
            };
            let message = if other.key == inst.key {
                format!(
                    "two of the matrix values of stage `{}` print alike: both instances would be `{}` (make them differ)",
                    inst.key, inst.id
                )
            } else {
                let of = |i: &Inst| {
                    if i.id == i.key {
                        format!("stage `{}`", i.key)
                    } else {
                        format!("an instance of stage `{}`", i.key)
                    }
                };
                format!(
                    "this id is also that of {} (rename one of them)",
                    of(if other.id == other.key { inst } else { other })
                )
            };
            let loc = self.key_at(&kp(&["stages", &inst.key]));
            return Err(self.error(loc, Some(&inst.id), None, message, None));
        }
        Ok(())
    }

    /// A [`LoopError`], located.
    fn loop_error(&self, e: LoopError) -> ManifestError {
        let location = if e.at_key {
            self.key_at(&e.at)
        } else {
            self.value_at(&e.at)
        };
        self.error(location, None, Some(&e.field), e.message, e.suggestion)
    }

    /// Every carried value's `init` reads what exists, located at the
    /// `init` rather than at the stages that read it.
    fn check_inits(&self, w: &World, manifest: &Manifest) -> Result<(), ManifestError> {
        let outside = Inst {
            id: String::new(),
            key: String::new(),
            matrix: BTreeMap::new(),
            round: None,
        };
        for (name, def) in &manifest.loops {
            for (value, carry) in &def.carry {
                let at = kp(&["loops", name, "carry", value, "init"]);
                let fail = |(m, s): (String, Option<String>)| {
                    let field = at.join(".");
                    self.error(self.value_at(&at), None, Some(&field), m, s)
                };
                for piece in interp::parse(&carry.init).map_err(|m| fail((m, None)))? {
                    match piece {
                        Piece::Stage(r) => drop(resolve_stage_ref(w, &outside, &r).map_err(fail)?),
                        Piece::Param(p) => drop(lookup_param(w, &p).map_err(fail)?),
                        Piece::Text(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Pass 2 for one instance: interpolate, bind and validate.
    fn resolve_instance(&self, world: &World, inst: &Inst) -> Result<Stage, ManifestError> {
        let (op, def, outputs) = &world.keys[inst.key.as_str()];
        let op = *op;
        let device = def.device.clone().unwrap_or_else(|| "auto".into());
        if !valid_device(&device) {
            let msg =
                format!("unknown device `{device}` (expected `auto`, `cpu`, `cuda` or `cuda:N`)");
            return Err(self.error(
                self.value_at(&stage_path(inst, &["device"])),
                Some(&inst.id),
                Some("device"),
                msg,
                None,
            ));
        }

        let resources = def.resources.clone().unwrap_or_default();
        if let Some((field, msg)) = resources.problem() {
            return Err(self.error(
                self.value_at(&stage_path(inst, &["resources"])),
                Some(&inst.id),
                Some(field),
                msg,
                None,
            ));
        }

        // Inputs first: a mistyped `${matrix.NAME}` there is a clearer
        // error than the unread matrix key it leaves as an unknown param.
        let mut inputs = BTreeMap::new();
        for (name, written) in &def.inputs {
            let input = self.input(world, inst, name, written)?;
            inputs.insert(name.clone(), input);
        }
        let params = self.instance_params(world, inst, def, op)?;
        self.check_input_names(inst, op, &inputs)?;
        if let Err(e) = op.check_bindings(&|name| inputs.contains_key(name), &params) {
            // At the input or param it names, else at the stage's `inputs`.
            let at: Vec<&str> = e.field.split('.').collect();
            let loc = self.key_at(&[kp(&["stages", &inst.key]), kp(&at)].concat());
            return Err(self.error(loc, Some(&inst.id), Some(&e.field), e.message, None));
        }

        // Free text, but a matrix instance or a round may name its values.
        let description = match &def.description {
            Some(d) => Some(substitute(world, inst, d).map_err(|(m, s)| {
                let at = stage_path(inst, &["description"]);
                self.error(
                    self.value_at(&at),
                    Some(&inst.id),
                    Some("description"),
                    m,
                    s,
                )
            })?),
            None => None,
        };

        Ok(Stage {
            id: inst.id.clone(),
            key: inst.key.clone(),
            op: op.name.to_string(),
            inputs,
            params,
            outputs: outputs.clone(),
            device,
            description,
            keep_checkpoints: def.keep_checkpoints.unwrap_or(false),
            resources,
            matrix: inst.matrix.clone(),
            round: inst.round.map(|round| LoopRound {
                name: world
                    .loops
                    .of(&inst.key)
                    .expect("a round has a loop")
                    .name
                    .clone(),
                round,
            }),
            location: self.key_at(&stage_path(inst, &[])),
        })
    }

    /// The instance's op params, interpolated and normalised by the op.
    fn instance_params(
        &self,
        world: &World,
        inst: &Inst,
        def: &StageDef,
        op: &OpDecl,
    ) -> Result<Json, ManifestError> {
        let mut obj = serde_json::Map::new();
        for (name, v) in &def.params {
            let mut p = stage_path(inst, &["params", name]);
            let v = self.interp_param(world, inst, v, &mut p)?;
            obj.insert(name.clone(), v);
        }
        // A matrix key the stage reads as `${matrix.NAME}` is only
        // substituted; any other is the op param of that name.
        let read = matrix_keys_read(def);
        for (name, v) in &inst.matrix {
            if !read.contains(name) {
                obj.insert(name.clone(), v.clone());
            }
        }
        let ranks_from_gpus = default_data_parallel(def, op, &mut obj);
        op.normalize_params(&Json::Object(obj)).map_err(|mut e| {
            if let Some(gpus) = ranks_from_gpus.filter(|_| e.field == "data_parallel") {
                e.message = format!(
                    "{} (data_parallel is {gpus}, from `resources.gpus: {gpus}`)",
                    e.message
                );
            }
            // A bad value that came from the command line is blamed on it,
            // not only on the manifest line that reads it.
            let first = e.field.split('.').next().unwrap_or_default();
            let from: Vec<String> = def
                .params
                .get(first)
                .map(|v| sets_read(v, world.sets))
                .unwrap_or_default();
            if !from.is_empty() {
                e.message = format!("{} (the value comes from {})", e.message, from.join(", "));
            }
            self.param_error(inst, e)
        })
    }

    /// The value at `path`, else the key of its nearest written ancestor.
    fn value_at(&self, path: &[String]) -> Location {
        match self.locs.get(path) {
            Some(spot) => spot.value.clone(),
            None => self.locs.nearest(path).key.clone(),
        }
    }

    /// The key of `path`, else the key of its nearest written ancestor.
    fn key_at(&self, path: &[String]) -> Location {
        self.locs.nearest(path).key.clone()
    }

    /// Unknown keys (with suggestions) and stages that are not mappings.
    /// Drops explicit nulls of optional keys, which mean "absent".
    fn check_structure(&self, tree: &mut Yaml) -> Result<(), ManifestError> {
        let top = tree.as_mapping_mut().expect("the merged tree is a mapping");
        for k in top.keys() {
            let k = key_text(k);
            if !TOP_KEYS.contains(&k.as_str()) {
                let loc = self.key_at(&kp(&[&k]));
                let s = nearest(&k, TOP_KEYS.iter().copied());
                return Err(self.error(loc, None, Some(&k), "unknown field".into(), s));
            }
        }
        top.retain(|k, v| {
            !(v.is_null() && matches!(k.as_str(), Some("params" | "loops" | "stages")))
        });
        if let Some(l) = top.get("loops") {
            loops::check_tree(l).map_err(|e| self.loop_error(e))?;
        }
        let Some(Yaml::Mapping(stages)) = top.get_mut("stages") else {
            return Ok(());
        };
        for (id, def) in stages.iter_mut() {
            let id = key_text(id);
            if let Some(problem) = name_problem(&id) {
                let loc = self.key_at(&kp(&["stages", &id]));
                let msg = format!("stage id `{id}` {problem}");
                return Err(self.error(loc, None, None, msg, None));
            }
            let Yaml::Mapping(def) = def else {
                let loc = self.value_at(&kp(&["stages", &id]));
                let msg = "a stage must be a mapping with at least `op`".to_string();
                return Err(self.error(loc, Some(&id), None, msg, None));
            };
            for k in def.keys() {
                let k = key_text(k);
                if !STAGE_KEYS.contains(&k.as_str()) {
                    let loc = self.key_at(&kp(&["stages", &id, &k]));
                    let s = nearest(&k, STAGE_KEYS.iter().copied());
                    return Err(self.error(loc, Some(&id), Some(&k), "unknown field".into(), s));
                }
            }
            def.retain(|k, v| !(v.is_null() && k.as_str() != Some("op")));
        }
        Ok(())
    }

    fn apply_set(
        &self,
        params: &mut BTreeMap<String, Json>,
        key: &str,
        value: &str,
    ) -> Result<(), ManifestError> {
        let loc = self.key_at(&kp(&["params"]));
        let Some(name) = key.strip_prefix("params.") else {
            let msg =
                format!("--set `{key}`: only pipeline params can be set, as `params.NAME=VALUE`");
            return Err(self.error(loc, None, Some(key), msg, None));
        };
        if !params.contains_key(name) {
            let msg = format!("--set: unknown param `{name}`");
            let s = nearest(name, params.keys().map(String::as_str)).map(|s| format!("params.{s}"));
            return Err(self.error(loc, None, Some(key), msg, s));
        }
        let parsed = parse_set_value(value).map_err(|why| {
            self.error(
                loc,
                None,
                Some(key),
                format!("--set `{key}={value}`: {why}"),
                None,
            )
        })?;
        params.insert(name.to_string(), parsed);
        Ok(())
    }

    /// Pipeline params are values, not templates: a `${...}` in one (or in
    /// a `--set` value) is refused, as anywhere else an unknown reference
    /// is, rather than spliced into a stage's command unread; `$${` is a
    /// literal `${`, as in the stages.
    fn unescape_params(
        &self,
        params: &mut BTreeMap<String, Json>,
        sets: &[(String, String)],
    ) -> Result<(), ManifestError> {
        fn walk(v: &mut Json) -> Result<(), String> {
            match v {
                Json::String(s) => {
                    let mut text = String::new();
                    for piece in interp::parse(s)? {
                        match piece {
                            Piece::Text(t) => text.push_str(&t),
                            Piece::Param(name) => {
                                return Err(format!("a param's value cannot read another param (`${{params.{name}}}`): give the value itself (write `$${{` for a literal `${{`)"))
                            }
                            Piece::Stage(r) => {
                                return Err(format!("`${{stages.{r}}}` in a param's value: stage references belong in a stage's `inputs`"))
                            }
                        }
                    }
                    *s = text;
                    Ok(())
                }
                Json::Array(items) => items.iter_mut().try_for_each(walk),
                Json::Object(map) => map.values_mut().try_for_each(walk),
                _ => Ok(()),
            }
        }
        for (name, value) in params.iter_mut() {
            let key = format!("params.{name}");
            walk(value).map_err(|message| match sets.iter().rev().find(|(k, _)| *k == key) {
                Some((_, set)) => self.error(
                    self.key_at(&kp(&["params"])),
                    None,
                    Some(&key),
                    format!("--set `{key}={set}`: {message}"),
                    None,
                ),
                None => self.error(
                    self.value_at(&kp(&["params", name])),
                    None,
                    Some(&key),
                    message,
                    None,
                ),
            })?;
        }
        Ok(())
    }

    fn op(&self, key: &str, def: &StageDef) -> Result<&'a OpDecl, ManifestError> {
        self.ops
            .iter()
            .copied()
            .find(|op| op.name == def.op)
            .ok_or_else(|| {
                let loc = self.value_at(&kp(&["stages", key, "op"]));
                let s = nearest(&def.op, self.ops.iter().map(|op| op.name));
                self.error(
                    loc,
                    Some(key),
                    Some("op"),
                    format!("unknown op `{}`", def.op),
                    s,
                )
            })
    }

    /// The stage's output names, checking its `outputs:` list.
    fn outputs(
        &self,
        key: &str,
        def: &StageDef,
        op: &OpDecl,
    ) -> Result<Vec<String>, ManifestError> {
        let at = |rest: &[&str]| {
            let mut p = kp(&["stages", key, "outputs"]);
            p.extend(rest.iter().map(|s| s.to_string()));
            p
        };
        if !op.outputs_from_stage() {
            if def.outputs.is_some() {
                let declared: Vec<String> = op
                    .declared_outputs()
                    .iter()
                    .map(|p| format!("`{}`", p.name))
                    .collect();
                let msg = format!(
                    "op `{}` declares its own outputs ({}); remove `outputs:`",
                    op.name,
                    declared.join(", ")
                );
                return Err(self.error(
                    self.key_at(&at(&[])),
                    Some(key),
                    Some("outputs"),
                    msg,
                    None,
                ));
            }
            return Ok(op
                .declared_outputs()
                .iter()
                .map(|p| p.name.to_string())
                .collect());
        }
        let Some(names) = &def.outputs else {
            let msg = format!(
                "op `{}` needs an `outputs:` list naming what the stage writes",
                op.name
            );
            return Err(self.error(self.key_at(&at(&[])), Some(key), Some("outputs"), msg, None));
        };
        if names.is_empty() {
            let msg = "`outputs` must name at least one output".to_string();
            return Err(self.error(
                self.value_at(&at(&[])),
                Some(key),
                Some("outputs"),
                msg,
                None,
            ));
        }
        for (i, name) in names.iter().enumerate() {
            let loc = self.value_at(&at(&[&i.to_string()]));
            let field = format!("outputs.{i}");
            if let Some(problem) = name_problem(name) {
                let msg = format!("output name `{name}` {problem}");
                return Err(self.error(loc, Some(key), Some(&field), msg, None));
            }
            if names[..i].contains(name) {
                return Err(self.error(
                    loc,
                    Some(key),
                    Some(&field),
                    format!("duplicate output `{name}`"),
                    None,
                ));
            }
        }
        Ok(names.clone())
    }

    /// The stage's matrix combinations: keys sorted, values as written,
    /// the last key varying fastest. A plain stage has one, empty.
    fn expand(
        &self,
        key: &str,
        def: &StageDef,
    ) -> Result<Vec<BTreeMap<String, Json>>, ManifestError> {
        let mut combos = vec![BTreeMap::new()];
        let Some(matrix) = &def.matrix else {
            return Ok(combos);
        };
        for (name, values) in matrix {
            let field = format!("matrix.{name}");
            if values.is_empty() {
                let loc = self.value_at(&kp(&["stages", key, "matrix", name]));
                return Err(self.error(
                    loc,
                    Some(key),
                    Some(&field),
                    "a matrix list must not be empty".into(),
                    None,
                ));
            }
            for (i, v) in values.iter().enumerate() {
                if v.is_array() || v.is_object() {
                    let loc = self.value_at(&kp(&["stages", key, "matrix", name, &i.to_string()]));
                    let msg = "matrix values must be scalars".to_string();
                    return Err(self.error(loc, Some(key), Some(&field), msg, None));
                }
            }
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(name.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        Ok(combos)
    }

    /// Interpolates a param value (recursing into lists and mappings).
    fn interp_param(
        &self,
        w: &World,
        inst: &Inst,
        v: &Json,
        at: &mut KeyPath,
    ) -> Result<Json, ManifestError> {
        let field = || at[2..].join(".");
        match v {
            Json::String(s) => {
                let fail = |msg: String, sug: Option<String>| {
                    self.error(self.value_at(at), Some(&inst.id), Some(&field()), msg, sug)
                };
                if let Some(round) = Loops::whole_round(s, inst.round) {
                    return Ok(round);
                }
                let s = substitute(w, inst, s).map_err(|(m, s)| fail(m, s))?;
                let pieces = interp::parse(&s).map_err(|m| fail(m, None))?;
                let mut out = String::new();
                for piece in &pieces {
                    match piece {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Param(name) => {
                            let value = lookup_param(w, name).map_err(|(m, s)| fail(m, s))?;
                            if pieces.len() == 1 {
                                return Ok(value.clone());
                            }
                            out.push_str(&interp::render(value));
                        }
                        Piece::Stage(r) => {
                            let msg = format!(
                                "`${{stages.{r}}}` in params: stage references belong in `inputs`, not `params`"
                            );
                            return Err(fail(msg, None));
                        }
                    }
                }
                Ok(Json::String(out))
            }
            Json::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    at.push(i.to_string());
                    out.push(self.interp_param(w, inst, item, at)?);
                    at.pop();
                }
                Ok(Json::Array(out))
            }
            Json::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, item) in map {
                    at.push(k.clone());
                    out.insert(k.clone(), self.interp_param(w, inst, item, at)?);
                    at.pop();
                }
                Ok(Json::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    /// Binds one input: a stage reference or a path.
    fn input(
        &self,
        w: &World,
        inst: &Inst,
        name: &str,
        written: &str,
    ) -> Result<Input, ManifestError> {
        let at = kp(&["stages", &inst.key, "inputs", name]);
        let location = self.value_at(&at);
        let field = format!("inputs.{name}");
        let fail = |msg: String, sug: Option<String>| {
            self.error(location.clone(), Some(&inst.id), Some(&field), msg, sug)
        };
        let written = &substitute(w, inst, written).map_err(|(m, s)| fail(m, s))?;
        let pieces = interp::parse(written).map_err(|m| fail(m, None))?;
        if let [Piece::Stage(r)] = pieces.as_slice() {
            let (stage, output) = resolve_stage_ref(w, inst, r).map_err(|(m, s)| fail(m, s))?;
            return Ok(Input::Stage {
                stage,
                output,
                location,
            });
        }
        let mut text = String::new();
        for piece in &pieces {
            match piece {
                Piece::Text(t) => text.push_str(t),
                Piece::Param(p) => text.push_str(&interp::render(
                    lookup_param(w, p).map_err(|(m, s)| fail(m, s))?,
                )),
                Piece::Stage(r) => {
                    let msg = format!(
                        "`${{stages.{r}}}` must be the whole input value, not part of `{written}`"
                    );
                    return Err(fail(msg, None));
                }
            }
        }
        if text.is_empty() {
            return Err(fail("an input path must not be empty".into(), None));
        }
        // Relative to the folder of the file that wrote this input.
        let dir = location.file.parent().unwrap_or(Path::new(""));
        let joined = dir.join(&text);
        let path = std::path::absolute(&joined).unwrap_or(joined);
        Ok(Input::Path {
            path,
            written: text,
            location,
        })
    }

    fn check_input_names(
        &self,
        inst: &Inst,
        op: &OpDecl,
        inputs: &BTreeMap<String, Input>,
    ) -> Result<(), ManifestError> {
        // `exec` hands every input to the command, whatever its name, in
        // a variable of its own: two names of one variable would hide one.
        if op.name == "exec" {
            let mut vars: HashMap<String, &str> = HashMap::new();
            for name in inputs.keys() {
                let var = alignflow_ops::exec::input_var(name);
                if let Some(other) = vars.insert(var.clone(), name) {
                    let loc = self.key_at(&kp(&["stages", &inst.key, "inputs", name]));
                    let msg =
                        format!("inputs `{other}` and `{name}` would both be ${var}: rename one");
                    let field = format!("inputs.{name}");
                    return Err(self.error(loc, Some(&inst.id), Some(&field), msg, None));
                }
            }
            return Ok(());
        }
        let declared = op.inputs;
        for name in inputs.keys() {
            if !declared.iter().any(|p| p.name == name) {
                let loc = self.key_at(&kp(&["stages", &inst.key, "inputs", name]));
                let msg = format!("op `{}` has no input `{name}`", op.name);
                let s = nearest(name, declared.iter().map(|p| p.name));
                return Err(self.error(
                    loc,
                    Some(&inst.id),
                    Some(&format!("inputs.{name}")),
                    msg,
                    s,
                ));
            }
        }
        for port in declared.iter().filter(|p| p.required) {
            if !inputs.contains_key(port.name) {
                let loc = self.key_at(&kp(&["stages", &inst.key, "inputs"]));
                let msg = format!("missing required input of op `{}`", op.name);
                return Err(self.error(
                    loc,
                    Some(&inst.id),
                    Some(&format!("inputs.{}", port.name)),
                    msg,
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Locates an op's [`ParamError`] at the param it names.
    fn param_error(&self, inst: &Inst, e: ParamError) -> ManifestError {
        // serde writes a list's items as `rewards[0]`; the manifest's paths
        // (and the messages) as `rewards.0`.
        let mut field: Vec<String> = e
            .field
            .split(['.', '['])
            .map(|s| s.trim_end_matches(']'))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut message = e.message.clone();
        // A bad value is shown at the value; anything else at a key.
        let mut at_value = !field.is_empty();
        // serde reports an unknown field at its parent: point at the field.
        if let Some(name) = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            if field.last().map(String::as_str) != Some(name) {
                field.push(name.to_string());
            }
            message = "unknown field".into();
            at_value = false;
        }
        let stage_path = kp(&["stages", &inst.key]);
        let mut candidates = Vec::new();
        let mut in_params = stage_path.clone();
        in_params.push("params".into());
        in_params.extend(field.iter().cloned());
        candidates.push(in_params);
        if let Some(first) = field.first() {
            candidates.push([stage_path.clone(), kp(&["matrix", first])].concat());
        }
        candidates.push([stage_path.clone(), kp(&["params"])].concat());
        let location = candidates
            .iter()
            .enumerate()
            .find_map(|(i, p)| {
                self.locs.get(p).map(|s| {
                    if i == 0 && at_value {
                        s.value.clone()
                    } else {
                        s.key.clone()
                    }
                })
            })
            .unwrap_or_else(|| self.key_at(&stage_path));
        let field = if field.is_empty() {
            "params".to_string()
        } else {
            format!("params.{}", field.join("."))
        };
        self.error(
            location,
            Some(&inst.id),
            Some(&field),
            message,
            e.suggestion,
        )
    }
}

/// Why `name` (a stage id, an exec output) cannot name a file inside a
/// folder without leaving it, if it cannot: output names become
/// `$ALIGNFLOW_OUT/NAME`, stage ids parts of file names.
fn name_problem(name: &str) -> Option<&'static str> {
    if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if name.is_empty() || name.contains(['/', '\\', '\0']) {
        Some("must be a plain non-empty name without `/`")
    } else {
        None
    }
}

/// `(stage, field)` for a key path: the stage id and the dotted rest.
fn split_field(at: &[String]) -> (Option<String>, Option<String>) {
    match at {
        [] => (None, None),
        [s, id, rest @ ..] if s == "stages" => (
            Some(id.clone()),
            if rest.is_empty() {
                None
            } else {
                Some(rest.join("."))
            },
        ),
        _ => (None, Some(at.join("."))),
    }
}

type RefError = (String, Option<String>);

/// `s` with the instance's values substituted as text: its round's
/// `${loop.NAME}`, then its `${matrix.NAME}`.
fn substitute(w: &World, inst: &Inst, s: &str) -> Result<String, RefError> {
    let s = w.loops.substitute(s, &inst.key, inst.round)?;
    interp::substitute_matrix(&s, &inst.matrix)
}

fn lookup_param<'w>(w: &'w World, name: &str) -> Result<&'w Json, RefError> {
    w.params.get(name).ok_or_else(|| {
        let s = nearest(name, w.params.keys().map(String::as_str)).map(|s| format!("params.{s}"));
        (format!("unknown param `${{params.{name}}}`"), s)
    })
}

/// Resolves `ID.OUTPUT` (the text after `stages.`) for `inst`, to a full
/// instance id and an output name.
fn resolve_stage_ref(w: &World, inst: &Inst, r: &str) -> Result<(String, String), RefError> {
    let written = format!("${{stages.{r}}}");
    let Some(key) = loops::stage_key(w.keys.keys().copied(), r) else {
        let end = r.find(['.', '[']).unwrap_or(r.len());
        let id = &r[..end];
        if let Some((_, _, outputs)) = w.keys.get(id) {
            return Err((
                format!(
                    "`{written}` names no output: write `${{stages.{id}.OUTPUT}}` (its outputs: {})",
                    outputs.join(", ")
                ),
                None,
            ));
        }
        let s = nearest(id, w.keys.keys().copied());
        return Err((format!("unknown stage `{id}` in `{written}`"), s));
    };
    let rest = &r[key.len()..];
    let instances = &w.by_key[key];
    let ids = || {
        instances
            .iter()
            .map(|&i| format!("`{}`", w.insts[i].id))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (target, output) = if rest.starts_with('[') {
        let close = rest
            .find(']')
            .ok_or_else(|| (format!("unterminated `[` in `{written}`"), None))?;
        let id = &r[..key.len() + close + 1];
        let output = rest[close + 1..].strip_prefix('.').ok_or_else(|| {
            (
                format!("expected `.OUTPUT` after `{id}` in `{written}`"),
                None,
            )
        })?;
        let Some(&i) = instances.iter().find(|&&i| w.insts[i].id == id) else {
            if let Some(l) = w.loops.of(key) {
                let msg = match loops::named_round(&rest[..=close]) {
                    Some(n) => format!(
                        "round {n} of loop `{}` does not exist in `{written}` (its rounds: 1 to {})",
                        l.name, l.rounds
                    ),
                    None => format!(
                        "`{key}` is a stage of loop `{}`: name a round as `{key}[round=N]` (1 to {}) in `{written}`",
                        l.name, l.rounds
                    ),
                };
                return Err((msg, None));
            }
            let s = nearest(id, instances.iter().map(|&i| w.insts[i].id.as_str()));
            return Err((
                format!("unknown stage `{id}` in `{written}` (instances: {})", ids()),
                s,
            ));
        };
        (i, output)
    } else if let Some(l) = w.loops.of(key) {
        // Inside the loop, a stage reads the same round; outside, a round
        // must be named.
        let same_round = instances
            .iter()
            .find(|&&i| inst.round.is_some() && w.insts[i].round == inst.round)
            .filter(|_| w.loops.of(&inst.key).is_some_and(|own| own.name == l.name));
        let Some(&i) = same_round else {
            let msg = format!(
                "`{key}` is a stage of loop `{}`, which runs {} round(s): name one, as `${{stages.{key}[round={}]{}}}`",
                l.name, l.rounds, l.rounds, rest
            );
            return Err((msg, None));
        };
        (i, &rest[1..])
    } else {
        let output = &rest[1..];
        let target_keys: Vec<&String> = w.insts[instances[0]].matrix.keys().collect();
        if target_keys.is_empty() {
            (instances[0], output)
        } else if target_keys.iter().all(|k| inst.matrix.contains_key(*k)) {
            let matching = instances
                .iter()
                .find(|&&i| {
                    w.insts[i]
                        .matrix
                        .iter()
                        .all(|(k, v)| inst.matrix.get(k) == Some(v))
                })
                .copied();
            let Some(i) = matching else {
                let msg = format!(
                    "no instance of matrix stage `{key}` matches this one in `{written}`: {}",
                    ids()
                );
                return Err((msg, None));
            };
            (i, output)
        } else {
            let msg = format!(
                "ambiguous reference `{written}`: `{key}` is a matrix stage; name one instance: {}",
                ids()
            );
            return Err((msg, None));
        }
    };
    let target = &w.insts[target];
    let outputs = &w.keys[target.key.as_str()].2;
    if output.is_empty() {
        return Err((format!("missing output name in `{written}`"), None));
    }
    if !outputs.iter().any(|o| o == output) {
        let msg = format!(
            "stage `{}` has no output `{output}` (referenced as `{written}`)",
            target.id
        );
        return Err((msg, nearest(output, outputs.iter().map(String::as_str))));
    }
    Ok((target.id.clone(), output.to_string()))
}

/// The matrix keys a stage reads through `${matrix.NAME}` in its params
/// or inputs.
fn matrix_keys_read(def: &StageDef) -> BTreeSet<String> {
    fn strings<'a>(v: &'a Json, out: &mut Vec<&'a str>) {
        match v {
            Json::String(s) => out.push(s),
            Json::Array(items) => items.iter().for_each(|i| strings(i, out)),
            Json::Object(map) => map.values().for_each(|i| strings(i, out)),
            _ => {}
        }
    }
    let mut texts: Vec<&str> = def.inputs.values().map(String::as_str).collect();
    def.params.values().for_each(|v| strings(v, &mut texts));
    texts.into_iter().flat_map(interp::matrix_names).collect()
}

/// `KEY[k1=v1,k2=v2]`, keys sorted, values as YAML writes scalars.
fn instance_id(key: &str, matrix: &BTreeMap<String, Json>) -> String {
    if matrix.is_empty() {
        return key.to_string();
    }
    let parts: Vec<String> = matrix
        .iter()
        .map(|(k, v)| format!("{k}={}", interp::render(v)))
        .collect();
    format!("{key}[{}]", parts.join(","))
}

fn valid_device(d: &str) -> bool {
    match d {
        "auto" | "cpu" | "cuda" => true,
        _ => d
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// The `--set` overrides a written param value reads (`${params.NAME}`),
/// as `--set params.NAME=VALUE`.
fn sets_read(value: &Json, sets: &[(String, String)]) -> Vec<String> {
    let text = value.to_string();
    sets.iter()
        .filter(|(key, _)| text.contains(&format!("${{{key}}}")))
        .map(|(key, v)| format!("`--set {key}={v}`"))
        .collect()
}

/// A `--set` value, typed as YAML: `1e-4` a float, `3` an int, `true` a
/// bool, `[1, 2]` a list, `{a: 1}` a mapping, other text a string. Text
/// that is not valid YAML (`[1, 2`) is an error, never a silent string.
pub(super) fn parse_set_value(value: &str) -> Result<Json, String> {
    if value.is_empty() {
        return Ok(Json::String(String::new()));
    }
    let yaml = serde_yaml::from_str::<Yaml>(value).map_err(|e| {
        format!("not valid YAML ({e}); quote it to pass it as text: --set 'params.NAME=\"...\"'")
    })?;
    serde_json::to_value(&yaml).map_err(|e| format!("not representable as JSON ({e})"))
}

/// `resources.gpus` as the data-parallel ranks of a training stage on
/// `device: cuda` that names none: one rank per GPU asked for, as
/// torchrun's `--nproc-per-node` is. Not with a `placement` (those GPUs are
/// the roles'), nor on another device (`auto` may be the CPU, where N
/// processes would each hold the model; `cuda:N` pins one GPU). Returns
/// the ranks it set.
fn default_data_parallel(
    def: &StageDef,
    op: &OpDecl,
    params: &mut serde_json::Map<String, Json>,
) -> Option<u32> {
    let gpus = def.resources.as_ref()?.gpus.filter(|&g| g > 1)?;
    let on_gpus = def.device.as_deref() == Some("cuda");
    let placed = params
        .get("placement")
        .is_some_and(|p| p.as_object().is_none_or(|o| !o.is_empty()));
    let takes_ranks = op.takes_param("data_parallel");
    if !on_gpus || placed || !takes_ranks || params.contains_key("data_parallel") {
        return None;
    }
    params.insert("data_parallel".into(), gpus.into());
    Some(gpus)
}
