//! The stage DAG (petgraph): edges from `${stages.ID.OUTPUT}` references,
//! cycle reports in order, topological order, target selection, and the
//! text and Graphviz views of `alignflow dag`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use petgraph::algo::{kosaraju_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::manifest::{Input, Location, Pipeline};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{location}: stage `{from}`, field `inputs.{input}`: references stage `{to}`, which does not exist{}", hint(.suggestion))]
    MissingStage {
        from: String,
        input: String,
        to: String,
        location: Location,
        suggestion: Option<String>,
    },
    #[error("{location}: stage `{from}`, field `inputs.{input}`: stage `{to}` has no output `{output}` (outputs: {available}){}", hint(.suggestion))]
    MissingOutput {
        from: String,
        input: String,
        to: String,
        output: String,
        available: String,
        location: Location,
        suggestion: Option<String>,
    },
    #[error("{location}: cycle in the pipeline: {}", .path.join(" -> "))]
    Cycle {
        path: Vec<String>,
        location: Location,
    },
    #[error("unknown target stage `{target}`{}", hint(.suggestion))]
    UnknownTarget {
        target: String,
        suggestion: Option<String>,
    },
}

fn hint(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// One edge: `to` reads output `output` of `from` as input `input`.
#[derive(Debug, Clone)]
pub struct Edge {
    pub output: String,
    pub input: String,
}

/// An input of a stage that reads another stage's output.
#[derive(Debug, Clone, Copy)]
pub struct StageInput<'a> {
    /// The input's name.
    pub name: &'a str,
    /// The producing stage: its index into `pipeline.stages`, and its id.
    pub from: usize,
    pub from_id: &'a str,
    /// The producer's output read.
    pub output: &'a str,
}

/// The resolved DAG of a pipeline. Node weights are indices into
/// `pipeline.stages`; edges point downstream (producer -> consumer).
#[derive(Debug)]
pub struct Dag {
    graph: DiGraph<usize, Edge>,
    nodes: Vec<NodeIndex>,
    /// Stage id -> index into `pipeline.stages`.
    index: HashMap<String, usize>,
    /// Stage indices in a topological order that keeps declaration order
    /// among independent stages.
    order: Vec<usize>,
}

impl Dag {
    /// Builds the DAG, checking every reference and rejecting cycles.
    pub fn build(pipeline: &Pipeline) -> Result<Dag, GraphError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        let index: HashMap<String, usize> = pipeline
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        for (i, stage) in pipeline.stages.iter().enumerate() {
            for (name, input) in &stage.inputs {
                let Input::Stage {
                    stage: to,
                    output,
                    location,
                } = input
                else {
                    continue;
                };
                let Some(&j) = index.get(to.as_str()) else {
                    return Err(GraphError::MissingStage {
                        from: stage.id.clone(),
                        input: name.clone(),
                        to: to.clone(),
                        location: location.clone(),
                        suggestion: crate::ops::nearest(
                            to,
                            pipeline.stages.iter().map(|s| s.id.as_str()),
                        ),
                    });
                };
                let producer = &pipeline.stages[j];
                if !producer.outputs.iter().any(|o| o == output) {
                    return Err(GraphError::MissingOutput {
                        from: stage.id.clone(),
                        input: name.clone(),
                        to: to.clone(),
                        output: output.clone(),
                        available: producer.outputs.join(", "),
                        location: location.clone(),
                        suggestion: crate::ops::nearest(
                            output,
                            producer.outputs.iter().map(String::as_str),
                        ),
                    });
                }
                graph.add_edge(
                    nodes[j],
                    nodes[i],
                    Edge {
                        output: output.clone(),
                        input: name.clone(),
                    },
                );
            }
        }
        if toposort(&graph, None).is_err() {
            return Err(cycle_error(pipeline, &graph));
        }
        let order = stable_topo_order(&graph, &nodes);
        Ok(Dag {
            graph,
            nodes,
            index,
            order,
        })
    }

    /// The index of stage `id` into `pipeline.stages`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The inputs of stage `i` that read another stage's output, by input name.
    pub fn stage_inputs<'a>(
        &'a self,
        pipeline: &'a Pipeline,
        i: usize,
    ) -> impl Iterator<Item = StageInput<'a>> + 'a {
        pipeline.stages[i]
            .inputs
            .iter()
            .filter_map(move |(name, input)| match input {
                Input::Stage { stage, output, .. } => Some(StageInput {
                    name,
                    from: self
                        .index_of(stage)
                        .expect("the DAG checked every reference"),
                    from_id: stage,
                    output,
                }),
                Input::Path { .. } => None,
            })
    }

    /// Stage indices in execution order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Direct upstream stages of stage `i`, with the edge.
    pub fn upstream(&self, i: usize) -> Vec<(usize, &Edge)> {
        self.graph
            .edges_directed(self.nodes[i], Direction::Incoming)
            .map(|e| (self.graph[e.source()], e.weight()))
            .collect()
    }

    /// Direct downstream stages of stage `i`.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The stages needed for `targets` (each a stage id, or a matrix stage's
    /// key meaning all its instances): the targets and all their ancestors.
    /// No targets selects everything.
    pub fn select(
        &self,
        pipeline: &Pipeline,
        targets: &[String],
    ) -> Result<BTreeSet<usize>, GraphError> {
        if targets.is_empty() {
            return Ok((0..pipeline.stages.len()).collect());
        }
        let mut selected = BTreeSet::new();
        let mut stack = Vec::new();
        for target in targets {
            let hits: Vec<usize> = pipeline
                .stages
                .iter()
                .enumerate()
                .filter(|(_, s)| &s.id == target || &s.key == target)
                .map(|(i, _)| i)
                .collect();
            if hits.is_empty() {
                return Err(GraphError::UnknownTarget {
                    target: target.clone(),
                    suggestion: crate::ops::nearest(
                        target,
                        pipeline.stages.iter().map(|s| s.id.as_str()),
                    ),
                });
            }
            stack.extend(hits);
        }
        while let Some(i) = stack.pop() {
            if selected.insert(i) {
                stack.extend(self.upstream(i).into_iter().map(|(j, _)| j));
            }
        }
        Ok(selected)
    }

    /// Plain-text view: each stage with its op, its description and where
    /// its inputs come from.
    pub fn to_text(&self, pipeline: &Pipeline) -> String {
        let mut out = String::new();
        for &i in &self.order {
            let stage = &pipeline.stages[i];
            let _ = writeln!(out, "{} ({})", stage.id, stage.op);
            if let Some(d) = &stage.description {
                let _ = writeln!(out, "  # {d}");
            }
            for (name, input) in &stage.inputs {
                match input {
                    Input::Stage {
                        stage: from,
                        output,
                        ..
                    } => {
                        let _ = writeln!(out, "  {name} <- {from}.{output}");
                    }
                    Input::Path { written, .. } => {
                        let _ = writeln!(out, "  {name} <- {written}");
                    }
                }
            }
        }
        out
    }

    /// Graphviz view.
    pub fn to_dot(&self, pipeline: &Pipeline) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = format!(
            "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
            q(&pipeline.name)
        );
        for &i in &self.order {
            let stage = &pipeline.stages[i];
            let _ = writeln!(
                out,
                "  {} [label={}];",
                q(&stage.id),
                q(&format!("{}\n{}", stage.id, stage.op))
            );
        }
        for e in self.graph.edge_references() {
            let (from, to) = (
                &pipeline.stages[self.graph[e.source()]],
                &pipeline.stages[self.graph[e.target()]],
            );
            let label = if e.weight().output == e.weight().input {
                e.weight().output.clone()
            } else {
                format!("{} -> {}", e.weight().output, e.weight().input)
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                q(&from.id),
                q(&to.id),
                q(&label)
            );
        }
        out.push_str("}\n");
        out
    }
}

/// Kahn's algorithm, always taking the ready stage declared first, so the
/// order is stable and reads like the manifest.
fn stable_topo_order(graph: &DiGraph<usize, Edge>, nodes: &[NodeIndex]) -> Vec<usize> {
    let mut indegree: Vec<usize> = nodes
        .iter()
        .map(|&n| graph.neighbors_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for n in graph.neighbors_directed(nodes[i], Direction::Outgoing) {
            let j = graph[n];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}

/// Finds one cycle and lists its stages in data-flow order, starting and
/// ending at the first-declared stage on it.
fn cycle_error(pipeline: &Pipeline, graph: &DiGraph<usize, Edge>) -> GraphError {
    let scc = kosaraju_scc(graph)
        .into_iter()
        .filter(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]))
        .min_by_key(|c| c.iter().map(|&n| graph[n]).min())
        .expect("toposort failed, so a cycle exists");
    let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
    let start = *scc.iter().min_by_key(|&&n| graph[n]).expect("non-empty");
    // Depth-first walk inside the component until we return to `start`.
    let mut path = vec![start];
    let mut visited = BTreeSet::from([start]);
    fn walk(
        graph: &DiGraph<usize, Edge>,
        members: &BTreeSet<NodeIndex>,
        start: NodeIndex,
        path: &mut Vec<NodeIndex>,
        visited: &mut BTreeSet<NodeIndex>,
    ) -> bool {
        let here = *path.last().expect("non-empty");
        let mut next: Vec<NodeIndex> = graph
            .neighbors_directed(here, Direction::Outgoing)
            .filter(|n| members.contains(n))
            .collect();
        next.sort_by_key(|&n| graph[n]);
        for n in next {
            if n == start {
                path.push(n);
                return true;
            }
            if visited.insert(n) {
                path.push(n);
                if walk(graph, members, start, path, visited) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(graph, &members, start, &mut path, &mut visited);
    let names: Vec<String> = path
        .iter()
        .map(|&n| pipeline.stages[graph[n]].id.clone())
        .collect();
    GraphError::Cycle {
        path: names,
        location: pipeline.stages[graph[start]].location.clone(),
    }
}
