//! The stage graph as inline SVG: one column per topological depth (the
//! longest path from a source stage), stages stacked in execution order
//! within a column, boxes filled by status, edges as curves from producer
//! to consumer.

use std::fmt::Write as _;

use super::collect::{ReportData, Status};
use super::escape::esc;

const BOX_W: usize = 180;
const BOX_H: usize = 46;
const GAP_X: usize = 70;
const GAP_Y: usize = 20;
const PAD: usize = 16;
/// Longest stage id shown in full inside a box (the full id is its title).
const MAX_LABEL: usize = 22;

/// Fill and stroke of a box of each status.
pub fn colours(status: Status) -> (&'static str, &'static str) {
    match status {
        Status::Cached => ("#c8e6c9", "#2e7d32"),
        Status::Stale => ("#ffe0b2", "#e65100"),
        Status::Failed => ("#ffcdd2", "#c62828"),
        Status::NeverRun => ("#eeeeee", "#757575"),
    }
}

/// The SVG of the DAG.
pub fn dag_svg(data: &ReportData) -> String {
    let columns = data
        .stages
        .iter()
        .map(|s| s.depth)
        .max()
        .map_or(0, |d| d + 1);
    // Edges that skip a column arc over the boxes between their ends; room
    // above the first row for the highest arc.
    let longest = data
        .edges
        .iter()
        .map(|e| data.stages[e.to].depth - data.stages[e.from].depth)
        .max()
        .unwrap_or(1);
    let top = PAD
        + if longest > 1 {
            14 + 6 * (longest - 2)
        } else {
            0
        };
    let mut rows_in = vec![0usize; columns];
    // (x, y) of each stage's box, in `data.stages` order.
    let mut at = Vec::with_capacity(data.stages.len());
    for s in &data.stages {
        let row = rows_in[s.depth];
        rows_in[s.depth] += 1;
        at.push((PAD + s.depth * (BOX_W + GAP_X), PAD + row * (BOX_H + GAP_Y)));
    }
    let width = PAD * 2 + columns * BOX_W + columns.saturating_sub(1) * GAP_X;
    let height = top + PAD + rows_in.iter().max().copied().unwrap_or(0) * (BOX_H + GAP_Y);
    let mut svg = format!(
        "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker></defs>\n"
    );
    for e in &data.edges {
        let (x1, y1) = at[e.from];
        let (x2, y2) = at[e.to];
        let (x1, y1) = (x1 + BOX_W, y1 + BOX_H / 2);
        let y2 = y2 + BOX_H / 2;
        let span = data.stages[e.to].depth - data.stages[e.from].depth;
        let d = if span > 1 {
            let lift = y1.min(y2) - (BOX_H / 2 + 24 + 8 * (span - 2)).min(y1.min(y2));
            let (c1, c2) = (x1 + GAP_X / 2, x2 - GAP_X / 2);
            format!("M {x1} {y1} C {c1} {lift}, {c2} {lift}, {x2} {y2}")
        } else {
            let mid = (x1 + x2) / 2;
            format!("M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}")
        };
        let _ = writeln!(
            svg,
            "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" d=\"{d}\" fill=\"none\" stroke=\"#555\" stroke-width=\"1.5\" marker-end=\"url(#arrow)\"><title>{}</title></path>",
            esc(&data.stages[e.from].id),
            esc(&data.stages[e.to].id),
            esc(&e.label)
        );
    }
    for (s, &(x, y)) in data.stages.iter().zip(&at) {
        let (fill, stroke) = colours(s.status);
        let label = if s.id.chars().count() > MAX_LABEL {
            let cut: String = s.id.chars().take(MAX_LABEL - 1).collect();
            format!("{cut}\u{2026}")
        } else {
            s.id.clone()
        };
        let _ = writeln!(
            svg,
            "<g class=\"stage\" data-stage=\"{id}\" data-status=\"{slug}\"><title>{id} ({op}): {status}, {reason}</title>\
             <rect x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"6\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"2\"/>\
             <text x=\"{tx}\" y=\"{ty1}\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"13\" font-weight=\"bold\">{label}</text>\
             <text x=\"{tx}\" y=\"{ty2}\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"11\" fill=\"#333\">{op} \u{b7} {status}</text></g>",
            id = esc(&s.id),
            slug = s.status.slug(),
            op = esc(&s.op),
            status = esc(s.status.label()),
            reason = esc(&s.reason),
            label = esc(&label),
            tx = x + BOX_W / 2,
            ty1 = y + 19,
            ty2 = y + 36,
        );
    }
    svg.push_str("</svg>\n");
    svg
}
