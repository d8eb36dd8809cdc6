//! An op declared as data: its name, version, ports, params and where it
//! runs. One `const` [`OpDecl`] per op file; [`crate::REGISTRY`] lists them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::stage::RunFn;

/// Everything the engine, the worker, `alignflow ops`, the schemas and the
/// README know about an op.
#[derive(Clone, Copy)]
pub struct OpDecl {
    /// Registered name (`dataset.import`).
    pub name: &'static str,
    /// Implementation version: bump it when outputs could change for the
    /// same inputs and params; it enters every stage fingerprint.
    pub version: u32,
    /// One line for `alignflow ops`.
    pub summary: &'static str,
    pub inputs: &'static [Port],
    pub outputs: Outputs,
    pub params: ParamsDecl,
    pub placement: Placement,
    /// The loss and scoring conventions a user comparing with another
    /// trainer needs (what is summed, what is averaged, where a reward is
    /// read, whether dropout is on), one line each; shown by `alignflow ops
    /// NAME`. Empty for ops without a loss.
    pub conventions: &'static [&'static str],
}

impl OpDecl {
    /// The declared outputs (empty for [`Outputs::FromStage`]).
    pub fn declared_outputs(&self) -> &'static [Port] {
        match self.outputs {
            Outputs::Declared(ports) => ports,
            Outputs::FromStage => &[],
        }
    }

    /// Whether the stage's `outputs:` list declares the outputs (`exec`).
    pub fn outputs_from_stage(&self) -> bool {
        matches!(self.outputs, Outputs::FromStage)
    }

    /// The stage's `params` validated and normalised (defaults filled in,
    /// numbers in canonical form): what enters the fingerprint.
    pub fn normalize_params(
        &self,
        params: &serde_json::Value,
    ) -> Result<serde_json::Value, ParamError> {
        (self.params.normalize)(params)
    }

    /// The op's rules on which optional inputs may be bound together, on
    /// normalised params.
    pub fn check_bindings(
        &self,
        bound: &dyn Fn(&str) -> bool,
        params: &serde_json::Value,
    ) -> Result<(), BindingError> {
        (self.params.check_bindings)(bound, params)
    }

    /// Whether the op's `params:` block has a param `name` (its schema
    /// lists it), e.g. whether it trains data-parallel (`data_parallel`).
    pub fn takes_param(&self, name: &str) -> bool {
        (self.params.schema)()
            .get("properties")
            .and_then(|p| p.as_object())
            .is_some_and(|p| p.contains_key(name))
    }

    /// Whether a stage of this op runs in an `alignflow-worker` process.
    pub fn runs_in_worker(&self) -> bool {
        matches!(self.placement, Placement::Worker)
    }
}

impl std::fmt::Debug for OpDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpDecl")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The outputs of an op.
#[derive(Debug, Clone, Copy)]
pub enum Outputs {
    /// Fixed ports, the same for every stage.
    Declared(&'static [Port]),
    /// Named by the stage's `outputs:` list (`exec`).
    FromStage,
}

/// Where a stage of an op runs.
#[derive(Clone, Copy)]
pub enum Placement {
    /// In the engine process (data ops, `exec`), by this function.
    Engine(RunFn),
    /// In an `alignflow-worker` process (anything that touches libtorch);
    /// the worker's own table holds the implementation.
    Worker,
}

impl Placement {
    /// `engine` or `worker`, for `alignflow ops`.
    pub fn label(&self) -> &'static str {
        match self {
            Placement::Engine(_) => "engine",
            Placement::Worker => "worker",
        }
    }
}

/// A declared input or output of an op.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub doc: &'static str,
    /// Inputs only: whether the stage must bind it.
    pub required: bool,
    /// Outputs only: bytes that legitimately differ between identical runs
    /// (timings in a metrics log); `run --locked` does not compare them.
    pub volatile: bool,
}

impl Port {
    const fn new(name: &'static str, doc: &'static str, required: bool, volatile: bool) -> Port {
        Port {
            name,
            doc,
            required,
            volatile,
        }
    }
    /// A required input.
    pub const fn input(name: &'static str, doc: &'static str) -> Port {
        Port::new(name, doc, true, false)
    }
    /// An optional input.
    pub const fn optional(name: &'static str, doc: &'static str) -> Port {
        Port::new(name, doc, false, false)
    }
    /// An output.
    pub const fn output(name: &'static str, doc: &'static str) -> Port {
        Port::new(name, doc, true, false)
    }
    /// An output whose bytes may differ between identical runs.
    pub const fn volatile(name: &'static str, doc: &'static str) -> Port {
        Port::new(name, doc, true, true)
    }
}

/// An op's params struct: the serde type that validates a stage's `params:`
/// block and generates its JSON schema, plus the rules a schema cannot say.
pub trait OpParams: DeserializeOwned + Serialize + schemars::JsonSchema {
    /// Rules on single values and combinations of params (ranges, "at
    /// least 1"), checked after the schema's.
    fn check(&self) -> Result<(), ParamError> {
        Ok(())
    }
    /// Rules on which optional inputs may be bound together ("exactly one
    /// reward source"). Checked when the manifest loads (so `validate` and
    /// `plan` report them) and again by the worker before anything loads.
    fn check_bindings(&self, _bound: &dyn Fn(&str) -> bool) -> Result<(), BindingError> {
        Ok(())
    }
}

/// The params half of an [`OpDecl`]: [`OpParams`] of one type, as functions
/// on JSON so the registry can hold every op in one table.
#[derive(Clone, Copy)]
pub struct ParamsDecl {
    /// JSON schema of the `params:` block.
    pub schema: fn() -> schemars::Schema,
    /// Validates `params` and returns them normalised (defaults filled in,
    /// numbers in canonical form): what enters the fingerprint.
    pub normalize: fn(&serde_json::Value) -> Result<serde_json::Value, ParamError>,
    /// [`OpParams::check_bindings`] on normalised params.
    pub check_bindings: fn(&dyn Fn(&str) -> bool, &serde_json::Value) -> Result<(), BindingError>,
}

impl ParamsDecl {
    /// The declaration for params type `P`.
    pub const fn of<P: OpParams>() -> ParamsDecl {
        ParamsDecl {
            schema: schema_of::<P>,
            normalize: normalize::<P>,
            check_bindings: check_bindings_of::<P>,
        }
    }
}

fn schema_of<P: OpParams>() -> schemars::Schema {
    schemars::schema_for!(P)
}

fn check_bindings_of<P: OpParams>(
    bound: &dyn Fn(&str) -> bool,
    params: &serde_json::Value,
) -> Result<(), BindingError> {
    let parsed: P = serde_json::from_value(params.clone()).expect("normalised params parse");
    parsed.check_bindings(bound)
}

/// Inputs bound in a combination the op cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct BindingError {
    /// `inputs.NAME`, `params.NAME`, or `inputs` for the block.
    pub field: String,
    pub message: String,
}

impl BindingError {
    pub fn new(field: &str, message: impl Into<String>) -> BindingError {
        BindingError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// A params block that does not fit an op's schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Dotted path of the offending field inside `params` (empty: the block).
    pub field: String,
    pub message: String,
    /// Nearest valid field name for a misspelt one.
    pub suggestion: Option<String>,
}

impl ParamError {
    /// A value out of range: `field` names the param.
    pub fn invalid(field: &str, message: impl Into<String>) -> ParamError {
        ParamError {
            field: field.into(),
            message: message.into(),
            suggestion: None,
        }
    }
}

/// `Ok` when `ok`, else a [`ParamError`] naming `field`: one line per rule
/// in an [`OpParams::check`].
pub fn require(ok: bool, field: &str, message: impl Into<String>) -> Result<(), ParamError> {
    if ok {
        Ok(())
    } else {
        Err(ParamError::invalid(field, message))
    }
}

/// The message of a count that must be positive.
pub const AT_LEAST_ONE: &str = "must be at least 1";

/// A sampling temperature: finite and not negative (0 is greedy).
pub fn check_temperature(temperature: f64) -> Result<(), ParamError> {
    require(
        temperature.is_finite() && temperature >= 0.0,
        "temperature",
        "must be a finite number >= 0",
    )?;
    // Logits divided by less overflow float32 (1e-40 drew the last token
    // id every step): greedy is 0.
    require(
        temperature == 0.0 || temperature >= MIN_TEMPERATURE,
        "temperature",
        "must be 0 (greedy) or at least 1e-4",
    )
}

/// The least temperature above 0.
pub const MIN_TEMPERATURE: f64 = 1e-4;

/// Stop strings: none empty (an empty one stops every answer at once).
pub fn check_stop(stop: &[String]) -> Result<(), ParamError> {
    require(
        stop.iter().all(|s| !s.is_empty()),
        "stop",
        "must not contain an empty string (it would end every answer after one token)",
    )
}

/// Deserialises `params` into `P`, runs [`OpParams::check`], and serialises
/// it back: validation and normalisation in one step, from the same struct
/// that makes the schema.
pub fn normalize<P: OpParams>(params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let parsed: P = parse(params)?;
    parsed.check()?;
    Ok(serde_json::to_value(parsed).expect("params serialise"))
}

/// `params` as `P`, with serde's error located at the field. `P` should use
/// `#[serde(deny_unknown_fields)]`.
fn parse<P: OpParams>(params: &serde_json::Value) -> Result<P, ParamError> {
    let params = if params.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        params.clone()
    };
    let known = || -> Option<Vec<String>> {
        schemars::schema_for!(P)
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
    };
    // Structs that flatten shared params cannot use `deny_unknown_fields`:
    // check top-level names against the schema, which lists them all.
    if let Some(given) = params.as_object() {
        if let Some(known) = known() {
            if let Some(unknown) = given.keys().find(|k| !known.contains(k)) {
                // Reported like serde does (at the parent), so the manifest
                // points at the misspelt key itself.
                return Err(ParamError {
                    field: String::new(),
                    message: format!("unknown field `{unknown}`"),
                    suggestion: nearest(unknown, known.iter().map(String::as_str)),
                });
            }
        }
    }
    serde_path_to_error::deserialize(&params).map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let message = err.inner().to_string();
        let field = if field.is_empty() && unknown_field(&message).is_none() {
            flattened_culprit::<P>(&params, &message).unwrap_or(field)
        } else {
            field
        };
        let suggestion = unknown_field(&message)
            .and_then(|name| nearest(name, known().unwrap_or_default().iter().map(String::as_str)));
        ParamError {
            field,
            message,
            suggestion,
        }
    })
}

/// The param a value error of a flattened struct is about: serde loses
/// the path through `#[serde(flatten)]` (a bad `temperature` of the shared
/// decoding params is reported at the root), so the first param whose
/// removal changes the error is taken for it.
fn flattened_culprit<P: OpParams>(params: &serde_json::Value, message: &str) -> Option<String> {
    let given = params.as_object()?;
    given.keys().find_map(|name| {
        let mut without = given.clone();
        without.remove(name);
        let changed = match serde_json::from_value::<P>(serde_json::Value::Object(without)) {
            Ok(_) => true,
            Err(e) => e.to_string() != message,
        };
        changed.then(|| name.clone())
    })
}

/// The name in serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The candidate closest to `name`, if close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}
