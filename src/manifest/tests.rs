//! Manifest loading, rule by rule, with exact error text.
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::resolve::load_with;
use super::*;
use crate::ops::{OpDecl, OpParams, Outputs, ParamsDecl, Placement, Port};

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TrainParams {
    lr: f64,
    #[serde(default)]
    kl_coef: f64,
    #[serde(default = "one")]
    epochs: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

fn one() -> u32 {
    1
}

impl OpParams for TrainParams {}

/// A test-only op with declared inputs, outputs and typed params.
const TRAIN: OpDecl = OpDecl {
    name: "train",
    version: 1,
    summary: "test op",
    inputs: &[Port::input("model", ""), Port::optional("data", "")],
    outputs: Outputs::Declared(&[Port::output("model", ""), Port::output("metrics", "")]),
    params: ParamsDecl::of::<TrainParams>(),
    placement: Placement::Worker,
    conventions: &[],
};

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    fn load_sets(&self, name: &str, sets: &[(&str, &str)]) -> Result<Pipeline, String> {
        let ops: Vec<&OpDecl> = vec![crate::ops::find("exec").unwrap(), &TRAIN];
        let options = LoadOptions {
            sets: sets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        load_with(&self.path().join(name), &options, &ops).map_err(|e| {
            assert!(e.location.is_some(), "every error is located: {e}");
            // Paths relative to the temp dir, for readable assertions.
            e.to_string()
                .replace(&format!("{}/", self.path().display()), "")
        })
    }
    fn load(&self, name: &str) -> Result<Pipeline, String> {
        self.load_sets(name, &[])
    }
    /// Writes `p.yaml` and loads it.
    fn one(&self, text: &str) -> Result<Pipeline, String> {
        self.write("p.yaml", text);
        self.load("p.yaml")
    }
}

const BASE: &str = "version: 1\nname: t\nparams:\n  lr: 3e-4\n  who: world\n";

#[test]
fn locations_are_one_based() {
    let locs =
        locate::Locs::index(Path::new("f.yaml"), "a: 1\nb:\n  c: [x, y]\n  d: {e: 2}\n").unwrap();
    let at = |p: &[&str]| {
        let s = locs.get(&include::kp(p)).unwrap();
        ((s.key.line, s.key.column), (s.value.line, s.value.column))
    };
    assert_eq!(at(&["a"]), ((1, 1), (1, 4)));
    assert_eq!(at(&["b", "c"]), ((3, 3), (3, 6)));
    assert_eq!(at(&["b", "c", "1"]), ((3, 10), (3, 10)));
    assert_eq!(at(&["b", "d", "e"]), ((4, 7), (4, 10)));
}

#[test]
fn yaml_syntax_error_is_located() {
    let d = Dir::new();
    let err = d.one("version: 1\nname: [t\n").unwrap_err();
    assert!(err.starts_with("p.yaml:3:1: invalid YAML: "), "{err}");
}

#[test]
fn a_duplicate_key_is_located_at_the_duplicate() {
    let d = Dir::new();
    let err = d
        .one("version: 1\nname: t\nstages:\n  s:\n    op: exec\n    outputs: [o]\n    params: {cmd: x}\n    outputs: [p]\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:5: invalid YAML: duplicate key `outputs` in `stages.s` (first at line 6)"
    );
}

#[test]
fn a_manifest_that_is_not_utf8_is_located_at_the_bad_byte() {
    let d = Dir::new();
    std::fs::write(
        d.path().join("p.yaml"),
        b"version: 1\nname: t\nstages:\n  s: {cmd: \"\xc3\xa9\xff\"}\n",
    )
    .unwrap();
    let err = d.load("p.yaml").unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:14: not UTF-8: byte 0xFF (manifests are UTF-8 text; re-save it as UTF-8)"
    );
}

#[test]
fn plain_pipeline() {
    let d = Dir::new();
    let p = d
        .one(&format!(
            "{BASE}seed: 7\nstages:\n  zeta:\n    op: exec\n    params: {{cmd: echo}}\n    outputs: [out]\n  alpha:\n    op: train\n    device: cuda:1\n    inputs: {{model: \"${{stages.zeta.out}}\", data: data/x.jsonl}}\n    params: {{lr: 0.1}}\n"
        ))
        .unwrap();
    assert_eq!(p.name, "t");
    assert_eq!(p.seed, 7);
    assert_eq!(p.params["lr"], json!(0.0003));
    // Declaration order, not key order.
    assert_eq!(
        p.stages.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["zeta", "alpha"]
    );
    let a = p.stage("alpha").unwrap();
    assert_eq!(a.params, json!({"lr": 0.1, "kl_coef": 0.0, "epochs": 1}));
    assert_eq!(a.outputs, ["model", "metrics"]);
    assert_eq!(a.device, "cuda:1");
    assert_eq!((a.location.line, a.location.column), (12, 3));
    match &a.inputs["model"] {
        Input::Stage { stage, output, .. } => {
            assert_eq!((stage.as_str(), output.as_str()), ("zeta", "out"))
        }
        other => panic!("{other:?}"),
    }
    match &a.inputs["data"] {
        Input::Path { path, written, .. } => {
            assert_eq!(written, "data/x.jsonl");
            assert_eq!(path, &d.path().join("data/x.jsonl"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.stage("zeta").unwrap().device, "auto");
}

#[test]
fn misspelt_top_level_key() {
    let d = Dir::new();
    let err = d.one("version: 1\nnaem: t\n").unwrap_err();
    assert_eq!(
        err,
        "p.yaml:2:1: field `naem`: unknown field (did you mean `name`?)"
    );
}

#[test]
fn misspelt_stage_key() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{BASE}stages:\n  sft:\n    op: train\n    parms: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:9:5: stage `sft`, field `parms`: unknown field (did you mean `params`?)"
    );
}

#[test]
fn unknown_op() {
    let d = Dir::new();
    let err = d
        .one(&format!("{BASE}stages:\n  sft:\n    op: trian\n"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:9: stage `sft`, field `op`: unknown op `trian` (did you mean `train`?)"
    );
}

#[test]
fn version_and_name() {
    let d = Dir::new();
    assert_eq!(
        d.one("version: 2\nname: t\n").unwrap_err(),
        "p.yaml:1:10: field `version`: unsupported manifest version 2 (this alignflow reads version 1)"
    );
    assert_eq!(
        d.one("version: 1\nname: a/b\n").unwrap_err(),
        "p.yaml:2:7: field `name`: the pipeline name must be non-empty and contain no `/`"
    );
    assert_eq!(
        d.one("version: 1\n").unwrap_err(),
        "p.yaml:1:1: missing field `name`"
    );
    assert_eq!(
        d.one("version: 1\nname: t\nseed: x\n").unwrap_err(),
        "p.yaml:3:7: field `seed`: invalid type: string \"x\", expected u64"
    );
}

#[test]
fn unknown_param_reference() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{BASE}stages:\n  s:\n    op: exec\n    outputs: [o]\n    params: {{cmd: \"echo ${{params.lrr}}\"}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:10:19: stage `s`, field `params.cmd`: unknown param `${params.lrr}` (did you mean `params.lr`?)"
    );
}

#[test]
fn env_reference_rejected_by_name() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{BASE}stages:\n  s:\n    op: exec\n    outputs: [o]\n    params:\n      cmd: echo ${{env.HOME}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:11:12: stage `s`, field `params.cmd`: unknown reference `${env.HOME}`: only `${params.NAME}`, `${stages.ID.OUTPUT}`, in a matrix stage `${matrix.NAME}` and in a loop's stage `${loop.NAME}` are allowed (write `$${` for a literal `${`)"
    );
}

#[test]
fn dollar_escape_and_text_rendering() {
    let d = Dir::new();
    let p = d
        .one(&format!(
            "{BASE}stages:\n  s:\n    op: exec\n    outputs: [o]\n    params:\n      cmd: echo $${{HOME}} ${{params.who}} $PATH ${{params.lr}}\n"
        ))
        .unwrap();
    assert_eq!(
        p.stages[0].params,
        json!({"cmd": "echo ${HOME} world $PATH 0.0003"})
    );
}

#[test]
fn whole_string_param_keeps_its_type() {
    let d = Dir::new();
    let p = d
        .one(&format!(
            "{BASE}  n: 3\nstages:\n  m:\n    op: exec\n    outputs: [o]\n    params: {{cmd: x}}\n  s:\n    op: train\n    inputs: {{model: \"${{stages.m.o}}\"}}\n    params:\n      lr: ${{params.lr}}\n      epochs: \"${{params.n}}\"\n      tag: run-${{params.n}}\n"
        ))
        .unwrap();
    assert_eq!(
        p.stage("s").unwrap().params,
        json!({"lr": 0.0003, "kl_coef": 0.0, "epochs": 3, "tag": "run-3"})
    );
}

#[test]
fn stage_reference_in_params_rejected() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{BASE}stages:\n  s:\n    op: exec\n    outputs: [o]\n    params: {{cmd: \"${{stages.s.o}}\"}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:10:19: stage `s`, field `params.cmd`: `${stages.s.o}` in params: stage references belong in `inputs`, not `params`"
    );
}

const SET: &str = "version: 1\nname: t\nparams:\n  lr: 0.1\n  epochs: 1\nstages:\n  m:\n    op: exec\n    outputs: [o]\n    params: {cmd: x}\n  s:\n    op: train\n    inputs: {model: \"${stages.m.o}\"}\n    params: {lr: \"${params.lr}\", epochs: \"${params.epochs}\"}\n";

#[test]
fn set_overrides_with_types() {
    let d = Dir::new();
    d.write("p.yaml", SET);
    let p = d
        .load_sets("p.yaml", &[("params.lr", "1e-4"), ("params.epochs", "3")])
        .unwrap();
    assert_eq!(p.params["lr"], json!(0.0001));
    assert!(p.params["lr"].is_f64());
    assert_eq!(p.params["epochs"], json!(3));
    assert!(p.params["epochs"].is_u64());
    assert_eq!(
        p.stage("s").unwrap().params,
        json!({"lr": 0.0001, "kl_coef": 0.0, "epochs": 3})
    );
    let parse = super::resolve::parse_set_value;
    assert_eq!(parse("true"), Ok(json!(true)));
    assert_eq!(parse("hello world"), Ok(json!("hello world")));
    assert_eq!(parse("[1, 2]"), Ok(json!([1, 2])));
    assert_eq!(parse("'[1, 2'"), Ok(json!("[1, 2")));
}

#[test]
fn set_values_that_are_not_yaml_or_do_not_fit_are_blamed_on_set() {
    let d = Dir::new();
    d.write("p.yaml", SET);
    let err = d
        .load_sets("p.yaml", &[("params.lr", "[1, 2")])
        .unwrap_err();
    assert!(
        err.starts_with("p.yaml:3:1: field `params.lr`: --set `params.lr=[1, 2`: not valid YAML ("),
        "{err}"
    );
    assert!(err.contains("quote it to pass it as text"), "{err}");
    let err = d.load_sets("p.yaml", &[("params.lr", "fast")]).unwrap_err();
    assert!(err.contains("stage `s`, field `params.lr`"), "{err}");
    assert!(
        err.ends_with("(the value comes from `--set params.lr=fast`)"),
        "{err}"
    );
}

#[test]
fn set_unknown_param() {
    let d = Dir::new();
    d.write("p.yaml", SET);
    let err = d.load_sets("p.yaml", &[("params.lrr", "1")]).unwrap_err();
    assert_eq!(
        err,
        "p.yaml:3:1: field `params.lrr`: --set: unknown param `lrr` (did you mean `params.lr`?)"
    );
    let err = d.load_sets("p.yaml", &[("seed", "1")]).unwrap_err();
    assert_eq!(err, "p.yaml:3:1: field `seed`: --set `seed`: only pipeline params can be set, as `params.NAME=VALUE`");
}

const MATRIX: &str = "version: 1\nname: t\nstages:\n  base:\n    op: exec\n    outputs: [model]\n    params: {cmd: x}\n  ppo:\n    op: train\n    inputs: {model: \"${stages.base.model}\"}\n    params: {lr: 9, kl_coef: 1}\n    matrix: {lr: [1, 2], kl_coef: [0.01, 0.05]}\n";

#[test]
fn matrix_ids_and_params() {
    let d = Dir::new();
    let p = d.one(MATRIX).unwrap();
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "base",
            "ppo[kl_coef=0.01,lr=1]",
            "ppo[kl_coef=0.01,lr=2]",
            "ppo[kl_coef=0.05,lr=1]",
            "ppo[kl_coef=0.05,lr=2]"
        ]
    );
    let s = p.stage("ppo[kl_coef=0.05,lr=1]").unwrap();
    assert_eq!(s.key, "ppo");
    assert_eq!(s.params, json!({"lr": 1.0, "kl_coef": 0.05, "epochs": 1}));
    assert_eq!(
        s.matrix,
        [
            ("kl_coef".to_string(), json!(0.05)),
            ("lr".to_string(), json!(1))
        ]
        .into()
    );
}

#[test]
fn two_stages_never_share_an_id() {
    let d = Dir::new();
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: train\n    matrix: {lr: [1, \"1\"]}\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:3: stage `e[lr=1]`, two of the matrix values of stage `e` print alike: both instances would be `e[lr=1]` (make them differ)"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: train\n    matrix: {lr: [1, 2]}\n  \"e[lr=2]\":\n    op: train\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:7:3: stage `e[lr=2]`, this id is also that of an instance of stage `e` (rename one of them)"
    );
}

#[test]
fn exec_inputs_of_one_variable_are_refused() {
    let d = Dir::new();
    d.write("f1.txt", "one");
    d.write("f2.txt", "two");
    let err = d
        .one("version: 1\nname: t\nstages:\n  a:\n    op: exec\n    outputs: [o]\n    inputs: {train-data: f1.txt, train_data: f2.txt}\n    params: {cmd: x}\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:7:34: stage `a`, field `inputs.train_data`: inputs `train-data` and `train_data` would both be $ALIGNFLOW_IN_TRAIN_DATA: rename one"
    );
}

#[test]
fn a_param_value_is_not_a_template() {
    let d = Dir::new();
    let stage =
        "stages:\n  a:\n    op: exec\n    outputs: [o]\n    params: {cmd: \"echo ${params.p}\"}\n";
    let err = d
        .one(&format!(
            "version: 1\nname: t\nparams: {{p: \"${{params.q}}\", q: 3}}\n{stage}"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:3:13: field `params.p`: a param's value cannot read another param (`${params.q}`): give the value itself (write `$${` for a literal `${`)"
    );
    // `$${` is a literal `${` in a param's value too.
    let p = d
        .one(&format!(
            "version: 1\nname: t\nparams: {{p: \"$${{HOME}}\"}}\n{stage}"
        ))
        .unwrap();
    assert_eq!(p.stages[0].params["cmd"], "echo ${HOME}");
    let err = d
        .load_sets("p.yaml", &[("params.p", "${HOME}")])
        .unwrap_err();
    assert!(
        err.contains("field `params.p`: --set `params.p=${HOME}`: unknown reference `${HOME}`"),
        "{err}"
    );
}

#[test]
fn matrix_strings_bools_and_empty() {
    let d = Dir::new();
    let p = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: exec\n    outputs: [o]\n    params: {cmd: x}\n    matrix: {flag: [true], mode: [fast, \"slow\"]}\n")
        .unwrap_err();
    // The matrix keys are not exec params: located at the matrix entry.
    assert_eq!(
        p,
        "p.yaml:8:14: stage `e[flag=true,mode=fast]`, field `params.flag`: unknown field"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: train\n    matrix: {lr: []}\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:18: stage `e`, field `matrix.lr`: a matrix list must not be empty"
    );
}

/// Two "methods" with different ops, and one matrix stage over them.
const METHODS: &str = "version: 1\nname: t\nstages:\n  a:\n    op: exec\n    outputs: [model]\n    params: {cmd: x}\n  b:\n    op: train\n    inputs: {model: \"${stages.a.model}\"}\n    params: {lr: 1}\n";

#[test]
fn a_matrix_over_the_method_picks_the_upstream_stage_by_name() {
    let d = Dir::new();
    let p = d
        .one(&format!(
            "{METHODS}  judge:\n    op: train\n    matrix: {{method: [a, b], lr: [0.5]}}\n    inputs: {{model: \"${{stages.${{matrix.method}}.model}}\"}}\n    params: {{epochs: 2, tag: \"m-${{matrix.method}}\"}}\n    description: judges ${{matrix.method}}\n"
        ))
        .unwrap();
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        ["a", "b", "judge[lr=0.5,method=a]", "judge[lr=0.5,method=b]"]
    );
    assert_eq!(
        p.stage("judge[lr=0.5,method=b]")
            .unwrap()
            .description
            .as_deref(),
        Some("judges b")
    );
    for (id, upstream) in [
        ("judge[lr=0.5,method=a]", "a"),
        ("judge[lr=0.5,method=b]", "b"),
    ] {
        let s = p.stage(id).unwrap();
        match &s.inputs["model"] {
            Input::Stage { stage, output, .. } => {
                assert_eq!((stage.as_str(), output.as_str()), (upstream, "model"))
            }
            other => panic!("{other:?}"),
        }
        // `method` is read through `${matrix.method}`, so it is not a
        // param; `lr` is not read, so it sets the param.
        let tag = format!("m-{upstream}");
        assert_eq!(
            s.params,
            json!({"lr": 0.5, "epochs": 2, "kl_coef": 0.0, "tag": tag})
        );
    }

    let err = d
        .one(&format!(
            "{METHODS}  judge:\n    op: train\n    matrix: {{method: [a, b]}}\n    inputs: {{model: \"${{stages.${{matrix.methd}}.model}}\"}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `judge[method=a]`, field `inputs.model`: unknown matrix key `methd` in `${matrix.methd}` (this stage's matrix has: method) (did you mean `method`?)"
    );
    let err = d
        .one(&format!(
            "{METHODS}  judge:\n    op: train\n    params: {{lr: \"${{matrix.lr}}\"}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:14:18: stage `judge`, field `params.lr`: `${matrix.lr}` in a stage without a `matrix`"
    );
}

const M2M: &str = "version: 1\nname: t\nstages:\n  base:\n    op: exec\n    outputs: [model]\n    params: {cmd: x}\n  ppo:\n    op: train\n    inputs: {model: \"${stages.base.model}\"}\n    params: {lr: 1}\n    matrix: {kl_coef: [0.01, 0.05]}\n";

#[test]
fn matrix_to_matrix_reference() {
    let d = Dir::new();
    let p = d
        .one(&format!(
            "{M2M}  evalm:\n    op: train\n    inputs: {{model: \"${{stages.ppo.model}}\"}}\n    params: {{lr: 1}}\n    matrix: {{kl_coef: [0.05, 0.01], epochs: [2]}}\n  pick:\n    op: train\n    inputs: {{model: \"${{stages.ppo[kl_coef=0.05].model}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap();
    let target = |id: &str| match &p.stage(id).unwrap().inputs["model"] {
        Input::Stage { stage, .. } => stage.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(target("evalm[epochs=2,kl_coef=0.05]"), "ppo[kl_coef=0.05]");
    assert_eq!(target("evalm[epochs=2,kl_coef=0.01]"), "ppo[kl_coef=0.01]");
    assert_eq!(target("pick"), "ppo[kl_coef=0.05]");
}

#[test]
fn ambiguous_matrix_reference() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{M2M}  ev:\n    op: train\n    inputs: {{model: \"${{stages.ppo.model}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: ambiguous reference `${stages.ppo.model}`: `ppo` is a matrix stage; name one instance: `ppo[kl_coef=0.01]`, `ppo[kl_coef=0.05]`"
    );
    let err = d
        .one(&format!("{M2M}  ev:\n    op: train\n    inputs: {{model: \"${{stages.ppo[kl_coef=0.5].model}}\"}}\n    params: {{lr: 1}}\n"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: unknown stage `ppo[kl_coef=0.5]` in `${stages.ppo[kl_coef=0.5].model}` (instances: `ppo[kl_coef=0.01]`, `ppo[kl_coef=0.05]`) (did you mean `ppo[kl_coef=0.05]`?)"
    );
}

#[test]
fn missing_stage_and_unknown_output() {
    let d = Dir::new();
    let err = d
        .one(&format!(
            "{M2M}  ev:\n    op: train\n    inputs: {{model: \"${{stages.bsae.model}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: unknown stage `bsae` in `${stages.bsae.model}` (did you mean `base`?)"
    );
    let err = d
        .one(&format!(
            "{M2M}  ev:\n    op: train\n    inputs: {{model: \"${{stages.base}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: `${stages.base}` names no output: write `${stages.base.OUTPUT}` (its outputs: model)"
    );
    let err = d
        .one(&format!(
            "{M2M}  ev:\n    op: train\n    inputs: {{model: \"${{stages.base.modle}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: stage `base` has no output `modle` (referenced as `${stages.base.modle}`) (did you mean `model`?)"
    );
    let err = d
        .one(&format!(
            "{M2M}  ev:\n    op: train\n    inputs: {{model: \"x/${{stages.base.model}}\"}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:15:21: stage `ev`, field `inputs.model`: `${stages.base.model}` must be the whole input value, not part of `x/${stages.base.model}`"
    );
}

#[test]
fn include_merge_and_relative_inputs() {
    let d = Dir::new();
    d.write(
        "common/base.yaml",
        "params:\n  lr: 0.5\nstages:\n  prep:\n    op: exec\n    inputs: {src: data/in.txt}\n    outputs: [o]\n    params: {cmd: base}\n",
    );
    d.write(
        "p.yaml",
        "version: 1\nname: t\ninclude: common/base.yaml\nstages:\n  prep:\n    params:\n      cmd: mine\n  later:\n    op: exec\n    inputs: {here: local.txt}\n    outputs: [o]\n    params: {cmd: \"echo ${params.lr}\"}\n",
    );
    let p = d.load("p.yaml").unwrap();
    assert_eq!(
        p.stages.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["prep", "later"]
    );
    let prep = p.stage("prep").unwrap();
    assert_eq!(prep.params, json!({"cmd": "mine"}));
    match &prep.inputs["src"] {
        Input::Path { path, location, .. } => {
            assert_eq!(path, &d.path().join("common/data/in.txt"));
            assert_eq!(location.file, d.path().join("common/base.yaml"));
            assert_eq!((location.line, location.column), (6, 19));
        }
        other => panic!("{other:?}"),
    }
    match &p.stage("later").unwrap().inputs["here"] {
        Input::Path { path, .. } => assert_eq!(path, &d.path().join("local.txt")),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.stage("later").unwrap().params, json!({"cmd": "echo 0.5"}));

    // Errors in an included value point into the included file.
    d.write("p2.yaml", "version: 1\nname: t\ninclude: [common/base.yaml]\nstages:\n  prep:\n    params: {cmdd: x}\n");
    let err = d.load("p2.yaml").unwrap_err();
    assert_eq!(
        err,
        "p2.yaml:6:14: stage `prep`, field `params.cmdd`: unknown field (did you mean `cmd`?)"
    );

    // A stage given another op replaces the included one whole: the base's
    // exec params and inputs are not the new op's.
    d.write("p3.yaml", "version: 1\nname: t\ninclude: [common/base.yaml]\nstages:\n  prep:\n    op: train\n    inputs: {model: local.txt}\n    params: {lr: 1}\n");
    let p = d.load("p3.yaml").unwrap();
    let prep = p.stage("prep").unwrap();
    assert_eq!(prep.op, "train");
    assert_eq!(prep.inputs.keys().collect::<Vec<_>>(), ["model"]);
    assert_eq!(prep.params["lr"], json!(1.0));
}

#[test]
fn include_cycle() {
    let d = Dir::new();
    d.write("a.yaml", "version: 1\nname: t\ninclude: b.yaml\n");
    d.write("b.yaml", "include:\n  - c.yaml\n");
    d.write("c.yaml", "include: [a.yaml]\n");
    let err = d.load("a.yaml").unwrap_err();
    assert_eq!(
        err,
        "c.yaml:1:11: field `include`: include cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"
    );
    d.write("m.yaml", "version: 1\nname: t\ninclude: missing.yaml\n");
    let err = d.load("m.yaml").unwrap_err();
    assert!(
        err.starts_with("m.yaml:3:10: field `include`: cannot read `"),
        "{err}"
    );
}

#[test]
fn a_base_two_includes_share_is_merged_once_where_it_first_comes() {
    let d = Dir::new();
    d.write(
        "base.yaml",
        "version: 1\nname: base\nparams: {a: base, b: base}\nstages:\n  s:\n    op: exec\n    outputs: [o]\n    params: {cmd: \"${params.a} ${params.b}\"}\n",
    );
    // `left` overrides `a`, `right` overrides `b`: both survive, where a
    // second merge of `base` under `right` would undo `left`'s `a`.
    d.write("left.yaml", "include: base.yaml\nparams: {a: left}\n");
    d.write("right.yaml", "include: base.yaml\nparams: {b: right}\n");
    d.write(
        "top.yaml",
        "version: 1\nname: top\ninclude: [left.yaml, right.yaml]\n",
    );
    let p = d.load("top.yaml").unwrap();
    assert_eq!(p.stage("s").unwrap().params["cmd"], "left right");
}

#[test]
fn outputs_rules() {
    let d = Dir::new();
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: exec\n    params: {cmd: x}\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:3: stage `e`, field `outputs`: op `exec` needs an `outputs:` list naming what the stage writes"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: exec\n    outputs: [a, b/c]\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:18: stage `e`, field `outputs.1`: output name `b/c` must be a plain non-empty name without `/`"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: exec\n    outputs: [a, a]\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:18: stage `e`, field `outputs.1`: duplicate output `a`"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  e:\n    op: train\n    outputs: [a]\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:5: stage `e`, field `outputs`: op `train` declares its own outputs (`model`, `metrics`); remove `outputs:`"
    );
}

#[test]
fn inputs_devices_and_params() {
    let d = Dir::new();
    let head = "version: 1\nname: t\nstages:\n  e:\n    op: train\n";
    let err = d
        .one(&format!("{head}    params: {{lr: 1}}\n"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:3: stage `e`, field `inputs.model`: missing required input of op `train`"
    );
    let err = d
        .one(&format!(
            "{head}    inputs: {{model: m, dta: d}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(err, "p.yaml:6:24: stage `e`, field `inputs.dta`: op `train` has no input `dta` (did you mean `data`?)");
    let err = d
        .one(&format!(
            "{head}    inputs: {{model: m}}\n    device: gpu\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:7:13: stage `e`, field `device`: unknown device `gpu` (expected `auto`, `cpu`, `cuda` or `cuda:N`)"
    );
    let err = d
        .one(&format!(
            "{head}    inputs: {{model: m}}\n    params: {{lr: fast}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:7:18: stage `e`, field `params.lr`: invalid type: string \"fast\", expected f64"
    );
    let err = d
        .one(&format!("{head}    inputs: {{model: m}}\n"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:3: stage `e`, field `params`: missing field `lr`"
    );
    let err = d
        .one(&format!(
            "{head}    inputs: {{model: m}}\n    params: {{epochs: 2}}\n"
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:7:5: stage `e`, field `params`: missing field `lr`"
    );
    let err = d
        .one(&format!(
            "{head}    inputs: {{model: 3}}\n    params: {{lr: 1}}\n"
        ))
        .unwrap_err();
    assert_eq!(err, "p.yaml:6:21: stage `e`, field `inputs.model`: invalid type: integer `3`, expected a string");
}

#[test]
fn dot_outputs_and_path_like_stage_ids_are_refused() {
    let d = Dir::new();
    for (name, col) in [(".", 18), ("..", 18)] {
        let err = d
            .one(&format!(
                "version: 1\nname: t\nstages:\n  e:\n    op: exec\n    outputs: [a, \"{name}\"]\n    params: {{cmd: x}}\n"
            ))
            .unwrap_err();
        assert_eq!(
            err,
            format!("p.yaml:6:{col}: stage `e`, field `outputs.1`: output name `{name}` must not be `.` or `..`")
        );
    }
    let err = d
        .one("version: 1\nname: t\nstages:\n  ../count:\n    op: exec\n    outputs: [a]\n    params: {cmd: x}\n")
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:4:3: stage id `../count` must be a plain non-empty name without `/`"
    );
    let err = d
        .one("version: 1\nname: t\nstages:\n  \"..\":\n    op: exec\n    outputs: [a]\n    params: {cmd: x}\n")
        .unwrap_err();
    assert_eq!(err, "p.yaml:4:3: stage id `..` must not be `.` or `..`");
}

/// A loop of two stages over three rounds, a stage before it and one after.
const LOOP: &str = r#"version: 1
name: t
params: {rounds: 3, lr: 0.5}
loops:
  online:
    rounds: ${params.rounds}
    carry:
      policy: { init: "${stages.sft.model}", next: "${stages.dpo.model}" }
    stages: [sample, dpo]
stages:
  sft:
    op: exec
    outputs: [model]
    params: {cmd: x}
  sample:
    op: exec
    inputs: {model: "${loop.policy}"}
    outputs: [samples]
    params: {cmd: "echo round ${loop.round} $${loop.round}"}
    description: "round ${loop.round}"
  dpo:
    op: train
    inputs: {model: "${loop.policy}", data: "${stages.sample.samples}"}
    params: {lr: "${params.lr}", epochs: "${loop.round}"}
  final:
    op: train
    inputs: {model: "${stages.dpo[round=3].model}"}
    params: {lr: 1}
"#;

/// The stage id that input `input` of stage `id` reads.
fn reads(p: &Pipeline, id: &str, input: &str) -> String {
    match &p.stage(id).unwrap().inputs[input] {
        Input::Stage { stage, output, .. } => format!("{stage}.{output}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_loop_unrolls_into_one_stage_per_round_each_reading_the_round_before() {
    let d = Dir::new();
    let p = d.one(LOOP).unwrap();
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "sft",
            "sample[round=1]",
            "dpo[round=1]",
            "sample[round=2]",
            "dpo[round=2]",
            "sample[round=3]",
            "dpo[round=3]",
            "final"
        ]
    );
    // Round 1 reads `init`, round k round k-1's `next`; inside a round a
    // stage reads the same round's stages.
    assert_eq!(reads(&p, "sample[round=1]", "model"), "sft.model");
    assert_eq!(reads(&p, "dpo[round=1]", "model"), "sft.model");
    assert_eq!(reads(&p, "sample[round=2]", "model"), "dpo[round=1].model");
    assert_eq!(reads(&p, "sample[round=3]", "model"), "dpo[round=2].model");
    assert_eq!(reads(&p, "dpo[round=3]", "data"), "sample[round=3].samples");
    assert_eq!(reads(&p, "final", "model"), "dpo[round=3].model");
    // `${loop.round}` inside text, escaped, alone (a number), described.
    let s = p.stage("sample[round=2]").unwrap();
    assert_eq!(s.key, "sample");
    assert_eq!(s.params["cmd"], "echo round 2 ${loop.round}");
    assert_eq!(s.description.as_deref(), Some("round 2"));
    assert_eq!(
        s.round,
        Some(LoopRound {
            name: "online".into(),
            round: 2
        })
    );
    assert_eq!(p.stage("dpo[round=3]").unwrap().params["epochs"], 3);
    assert_eq!(p.stage("final").unwrap().round, None);
    // `rounds: ${params.rounds}` follows `--set`.
    let p = d.load_sets("p.yaml", &[("params.rounds", "4")]).unwrap();
    assert_eq!(reads(&p, "sample[round=4]", "model"), "dpo[round=3].model");
    assert_eq!(p.stages.len(), 10);
}

#[test]
fn a_carried_value_may_lag_another_by_a_round() {
    let d = Dir::new();
    let lagged = LOOP.replace(
        "      policy:",
        "      previous: { init: \"${stages.sft.model}\", next: \"${loop.policy}\" }\n      policy:",
    );
    let p = d
        .one(&lagged.replace(
            "data: \"${stages.sample.samples}\"",
            "data: \"${loop.previous}\"",
        ))
        .unwrap();
    assert_eq!(reads(&p, "dpo[round=1]", "data"), "sft.model");
    assert_eq!(reads(&p, "dpo[round=2]", "data"), "sft.model");
    assert_eq!(reads(&p, "dpo[round=3]", "data"), "dpo[round=1].model");
}

#[test]
fn a_carried_value_that_no_stage_of_the_loop_produces_is_refused() {
    let d = Dir::new();
    let err = d
        .one(&LOOP.replace(
            "next: \"${stages.dpo.model}\"",
            "next: \"${stages.sft.model}\"",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:52: field `loops.online.carry.policy.next`: the carried value is never produced: `next` reads `sft`, which is not a stage of loop `online` (its stages: sample, dpo)"
    );
    let err = d
        .one(&LOOP.replace(
            "next: \"${stages.dpo.model}\"",
            "next: \"${stages.dpo.modl}\"",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:52: field `loops.online.carry.policy.next`: the carried value is never produced: stage `dpo` has no output `modl` (outputs: model, metrics) (did you mean `model`?)"
    );
    let err = d
        .one(&LOOP.replace(
            "next: \"${stages.dpo.model}\"",
            "next: \"${stages.dpp.model}\"",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:52: field `loops.online.carry.policy.next`: unknown stage `dpp` in `next` (loop `online`'s stages: sample, dpo) (did you mean `dpo`?)"
    );
    let err = d
        .one(&LOOP.replace("${loop.policy}\", data", "${loop.polcy}\", data"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:23:21: stage `dpo[round=1]`, field `inputs.model`: unknown carried value `polcy` in `${loop.polcy}` (loop `online` carries: policy; `${loop.round}` is the round) (did you mean `policy`?)"
    );
    let err = d
        .one(&LOOP.replace(
            "{model: \"${stages.dpo[round=3].model}\"}",
            "{model: \"${loop.policy}\"}",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:27:21: stage `final`, field `inputs.model`: `${loop.policy}` in stage `final`, which is in no loop (list it in a loop's `stages:`)"
    );
    let err = d
        .one(&LOOP.replace(
            "init: \"${stages.sft.model}\"",
            "init: \"${stages.sfr.model}\"",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:23: field `loops.online.carry.policy.init`: unknown stage `sfr` in `${stages.sfr.model}` (did you mean `sft`?)"
    );
}

#[test]
fn a_round_that_does_not_exist_is_refused() {
    let d = Dir::new();
    let err = d
        .one(&LOOP.replace("dpo[round=3].model", "dpo[round=4].model"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:27:21: stage `final`, field `inputs.model`: round 4 of loop `online` does not exist in `${stages.dpo[round=4].model}` (its rounds: 1 to 3)"
    );
    let err = d
        .one(&LOOP.replace("dpo[round=3].model", "dpo.model"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:27:21: stage `final`, field `inputs.model`: `dpo` is a stage of loop `online`, which runs 3 round(s): name one, as `${stages.dpo[round=3].model}`"
    );
    // With one round more, round 4 exists.
    d.write(
        "p.yaml",
        &LOOP.replace("dpo[round=3].model", "dpo[round=4].model"),
    );
    let p = d.load_sets("p.yaml", &[("params.rounds", "4")]).unwrap();
    assert_eq!(reads(&p, "final", "model"), "dpo[round=4].model");
    for (rounds, why) in [
        ("0", "a loop runs from 1 to 1000 rounds, not 0"),
        ("2.5", "a loop runs from 1 to 1000 rounds, not 2.5"),
        ("-1", "a loop runs from 1 to 1000 rounds, not -1"),
        (
            "\"2\"",
            "`rounds` must be a whole number or `${params.NAME}`, not the text \"2\" (write 2 without quotes)",
        ),
        (
            "\"${params.lr}\"",
            "a loop runs from 1 to 1000 rounds, not 0.5 (`${params.lr}`)",
        ),
    ] {
        let err = d
            .one(&LOOP.replace("${params.rounds}", rounds))
            .unwrap_err();
        assert_eq!(
            err,
            format!("p.yaml:6:13: field `loops.online.rounds`: {why}")
        );
    }
    let err = d
        .one(&LOOP.replace("${params.rounds}", "${params.round}"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:13: field `loops.online.rounds`: unknown param `${params.round}` (did you mean `params.rounds`?)"
    );
}

#[test]
fn loops_do_not_nest_and_a_stage_is_in_one_loop() {
    let d = Dir::new();
    let err = d
        .one(&LOOP.replace(
            "    stages: [sample, dpo]\n",
            "    stages: [sample, dpo]\n    loops: {inner: {rounds: 2, stages: [sft]}}\n",
        ))
        .unwrap_err();
    assert!(
        err.starts_with(
            "p.yaml:10:5: field `loops.online.loops`: a loop inside a loop is not supported"
        ),
        "{err}"
    );
    let err = d
        .one(&LOOP.replace(
            "    stages: [sample, dpo]\n",
            "    stages: [sample, dpo, inner]\n  inner: {rounds: 2, stages: [sft]}\n",
        ))
        .unwrap_err();
    assert!(
        err.starts_with("p.yaml:9:27: field `loops.online.stages.2`: `inner` is a loop, and a loop inside a loop is not supported"),
        "{err}"
    );
    let err = d
        .one(&LOOP.replace(
            "    stages: [sample, dpo]\n",
            "    stages: [sample, dpo]\n  again: {rounds: 2, stages: [dpo]}\n",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:10:31: field `loops.again.stages.0`: stage `dpo` is already in loop `online`: a stage belongs to one loop (a loop inside a loop is not supported)"
    );
    let err = d
        .one(&LOOP.replace("[sample, dpo]", "[sample, dpp]"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:9:22: field `loops.online.stages.1`: unknown stage `dpp` in loop `online` (did you mean `dpo`?)"
    );
    let err = d
        .one(&LOOP.replace("    rounds: ${params.rounds}", "    round: 3"))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:6:5: field `loops.online.round`: unknown field (did you mean `rounds`?)"
    );
}

#[test]
fn a_cycle_through_next_or_init_is_refused() {
    let d = Dir::new();
    let swapped = LOOP.replace(
        "      policy: { init: \"${stages.sft.model}\", next: \"${stages.dpo.model}\" }",
        "      policy: { init: \"${stages.sft.model}\", next: \"${loop.other}\" }\n      other: { init: \"${stages.sft.model}\", next: \"${loop.policy}\" }",
    );
    let err = d.one(&swapped).unwrap_err();
    assert_eq!(
        err,
        "p.yaml:9:51: field `loops.online.carry.other.next`: cycle through `next`: other -> policy -> other (each takes the other's value, so no stage of loop `online` ever produces them; one `next` must read a stage's output, `${stages.STAGE.OUTPUT}`)"
    );
    let err = d
        .one(&LOOP.replace(
            "init: \"${stages.sft.model}\"",
            "init: \"${stages.dpo.model}\"",
        ))
        .unwrap_err();
    assert!(
        err.starts_with("p.yaml:8:23: field `loops.online.carry.policy.init`: cycle through `init`: `dpo` is a stage of loop `online`, so round 1 would read its own output"),
        "{err}"
    );
    let err = d
        .one(&LOOP.replace(
            "next: \"${stages.dpo.model}\"",
            "next: \"${stages.dpo[round=1].model}\"",
        ))
        .unwrap_err();
    assert_eq!(
        err,
        "p.yaml:8:52: field `loops.online.carry.policy.next`: `next` reads the round that just ended: write `${stages.dpo.OUTPUT}` without a round"
    );
}

#[test]
fn resources_gpus_are_the_ranks_of_a_training_stage_on_gpus_that_names_none() {
    let d = Dir::new();
    let stage = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    op: sft\n    inputs: {{model: m, data: d.jsonl}}\n    params: {{batch_size: 8{extra}}}\n"
        )
    };
    let on = |device: &str, gpus: u32| {
        format!("    device: {device}\n    resources: {{gpus: {gpus}}}\n")
    };
    let text = [
        stage("gpus", "") + &on("cuda", 4),
        stage("cpu", "") + &on("cpu", 4),
        stage("auto", "") + &on("auto", 4),
        stage("pinned", "") + &on("cuda:1", 4),
        stage("named", ", data_parallel: 2") + &on("cuda", 4),
        stage("one", "") + &on("cuda", 1),
        stage("too_many", "") + &on("cuda", 16),
    ]
    .iter()
    .fold("version: 1\nname: t\nstages:\n".to_string(), |text, s| {
        text + s
    });
    d.write("p.yaml", &text);
    let load = || {
        load_with(
            &d.path().join("p.yaml"),
            &LoadOptions::default(),
            crate::ops::REGISTRY,
        )
    };
    let err = load().unwrap_err().to_string();
    assert!(
        err.contains("stage `too_many`")
            && err.contains("(data_parallel is 16, from `resources.gpus: 16`)"),
        "{err}"
    );
    d.write("p.yaml", &text.replace("gpus: 16", "gpus: 2"));
    let p = load().unwrap();
    let ranks = |id: &str| p.stage(id).unwrap().params.get("data_parallel").cloned();
    assert_eq!(ranks("gpus"), Some(json!(4)));
    assert_eq!(
        ranks("cpu"),
        None,
        "on the CPU, ranks are the user's word only"
    );
    assert_eq!(ranks("auto"), None, "`auto` may be the CPU");
    assert_eq!(ranks("pinned"), None, "`cuda:1` is one GPU");
    assert_eq!(
        ranks("named"),
        Some(json!(2)),
        "a written data_parallel wins"
    );
    assert_eq!(ranks("one"), None);
    assert_eq!(ranks("too_many"), Some(json!(2)));
}
