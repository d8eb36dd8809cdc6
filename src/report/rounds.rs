//! Win rates per round: for every loop stage whose rounds each wrote an
//! `evaluate`-shaped report (`judges.NAME.win_rate`), one table with a row
//! per round and one plot per judge with a point per round, so an iterated
//! pipeline shows whether its rounds improve.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::collect::Evaluation;
use super::escape::esc;
use super::html::{ci_text, scalar};
use super::plots::curve_svg;
use super::ReportError;

/// One loop stage's evaluations, by round.
struct PerRound<'a> {
    loop_name: &'a str,
    key: &'a str,
    rounds: BTreeMap<u64, &'a Evaluation>,
    judges: BTreeSet<&'a str>,
}

/// Appends the per-round tables and plots (nothing when no loop stage
/// evaluated anything).
pub fn rounds_section(page: &mut String, evaluations: &[Evaluation]) -> Result<(), ReportError> {
    for group in per_round(evaluations) {
        let _ = write!(
            page,
            "<div class=\"rounds\" data-loop=\"{l}\" data-stage=\"{k}\">\n<h3>{k}: win rate per round of loop {l}</h3>\n<table class=\"rounds\">\n<tr><th>round</th><th>stage</th><th>policy</th><th>reference</th>",
            l = esc(group.loop_name),
            k = esc(group.key),
        );
        for judge in &group.judges {
            let _ = write!(
                page,
                "<th>{j}: win rate</th><th>{j}: 95% CI</th>",
                j = esc(judge)
            );
        }
        page.push_str("<th>n</th></tr>\n");
        for (round, e) in &group.rounds {
            let text = |key: &str| e.value.get(key).map(scalar).unwrap_or_default();
            let _ = write!(
                page,
                "<tr class=\"round-row\" data-round=\"{round}\"><td>{round}</td><td>{}</td><td>{}</td><td>{}</td>",
                esc(&e.stage),
                esc(&text("policy")),
                esc(&text("reference")),
            );
            for judge in &group.judges {
                let figures = e.value.get("judges").and_then(|j| j.get(*judge));
                let win = figures
                    .and_then(|f| f.get("win_rate"))
                    .and_then(|w| w.as_f64())
                    .map(|w| format!("{w:.3}"))
                    .unwrap_or_default();
                let ci = figures.map(ci_text).unwrap_or_default();
                let _ = write!(page, "<td>{}</td><td>{}</td>", esc(&win), esc(&ci));
            }
            let _ = writeln!(page, "<td>{}</td></tr>", esc(&text("n")));
        }
        page.push_str("</table>\n<div class=\"plots\">\n");
        for judge in &group.judges {
            let points: Vec<(f64, f64)> = group
                .rounds
                .iter()
                .filter_map(|(round, e)| {
                    let w = e.value.get("judges")?.get(*judge)?.get("win_rate")?;
                    Some((*round as f64, w.as_f64()?))
                })
                .collect();
            let series = format!("{}/win_rate/{judge}", group.key);
            let field = format!("win rate ({judge})");
            page.push_str(&curve_svg(&series, &field, "round", &points)?);
        }
        page.push_str("</div>\n</div>\n");
    }
    Ok(())
}

/// Evaluations of loop stages, grouped by loop and stage key, in the
/// order their stages come.
fn per_round(evaluations: &[Evaluation]) -> Vec<PerRound<'_>> {
    let mut groups: Vec<PerRound> = Vec::new();
    for e in evaluations {
        let Some(round) = &e.round else { continue };
        let Some(judges) = e.value.get("judges").and_then(|j| j.as_object()) else {
            continue;
        };
        let at = groups
            .iter()
            .position(|g| g.loop_name == round.name && g.key == e.key);
        let group = match at {
            Some(i) => &mut groups[i],
            None => {
                groups.push(PerRound {
                    loop_name: &round.name,
                    key: &e.key,
                    rounds: BTreeMap::new(),
                    judges: BTreeSet::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        group.rounds.insert(round.round, e);
        for (judge, figures) in judges {
            if figures.get("win_rate").is_some_and(|w| w.is_number()) {
                group.judges.insert(judge);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::LoopRound;

    fn eval(round: u64, w: f64) -> Evaluation {
        Evaluation {
            stage: format!("evaluation[round={round}]"),
            key: "evaluation".into(),
            round: Some(LoopRound {
                name: "online".into(),
                round,
            }),
            output: "report".into(),
            previous_run: false,
            value: serde_json::json!({
                "policy": format!("dpo_round_{round}"), "reference": "sl_cai", "n": 60,
                "judges": {"feedback_model": {"win_rate": w, "ci95": [w - 0.1, w + 0.1]}}
            }),
        }
    }

    #[test]
    fn one_row_and_one_point_per_round_in_round_order() {
        let plain = Evaluation {
            round: None,
            key: "final".into(),
            stage: "final".into(),
            ..eval(1, 0.9)
        };
        let mut page = String::new();
        rounds_section(
            &mut page,
            &[eval(2, 0.6), plain, eval(1, 0.5), eval(3, 0.7)],
        )
        .unwrap();
        assert_eq!(page.matches("<tr class=\"round-row\"").count(), 3, "{page}");
        let first = page.find("data-round=\"1\"").unwrap();
        assert!(first < page.find("data-round=\"2\"").unwrap(), "{page}");
        assert!(page.contains(
            "<td>2</td><td>evaluation[round=2]</td><td>dpo_round_2</td><td>sl_cai</td><td>0.600</td><td>[0.500, 0.700]</td><td>60</td>"
        ), "{page}");
        assert!(!page.contains("final"), "{page}");
        let curves = super::super::plots::tests::points_of(&page);
        assert_eq!(curves.len(), 1, "one judge, one curve: {page}");
        let c = &curves[0];
        assert_eq!(c.len(), 3, "a point per round");
        // Rounds left to right; the win rate rises, so the curve goes up
        // (SVG y grows downwards).
        assert!(
            c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 > w[1].1),
            "{c:?}"
        );
        assert!(page.contains("data-series=\"evaluation/win_rate/feedback_model\""));
    }

    #[test]
    fn nothing_without_loop_evaluations() {
        let mut page = String::new();
        rounds_section(&mut page, &[]).unwrap();
        assert!(page.is_empty());
    }
}
