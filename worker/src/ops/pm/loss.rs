//! The soft-label Bradley-Terry loss and the paired reward forward.

use tch::{Device, Kind, Tensor};

use super::super::training::right_pad;
use crate::model::Model;

/// Mean (or weighted mean) soft-label Bradley-Terry loss
/// `-(p*logsig(rA - rB) + (1-p)*logsig(rB - rA))`: `p` is the probability
/// that A is preferred (1 for a hard label). With `weights`, the batch loss
/// is `sum(w*l) / sum(w)`. Computed in float32 whatever the rewards' kind.
///
/// Its gradient with respect to `rA` is `-(p - sigmoid(rA - rB)) * w / sum(w)`.
///
/// # Shapes
/// `r_a`, `r_b`, `p`, `weights`: `[b]` -> `[]`.
pub fn soft_bt_loss(r_a: &Tensor, r_b: &Tensor, p: &Tensor, weights: Option<&Tensor>) -> Tensor {
    let d = (r_a - r_b).to_kind(Kind::Float);
    let p = p.to_kind(Kind::Float);
    // log_sigmoid is the stable `-softplus(-x)`, exact for large |margins|.
    let log_a: Tensor = d.log_sigmoid();
    let log_b: Tensor = d.neg().log_sigmoid();
    let not_p: Tensor = p.neg() + 1.0;
    let per_pair: Tensor = (log_a * &p + log_b * &not_p).neg();
    match weights {
        Some(w) => {
            let w = w.to_kind(Kind::Float);
            (&per_pair * &w).sum(Kind::Float) / w.sum(Kind::Float).clamp_min(1e-12)
        }
        None => per_pair.mean(Kind::Float),
    }
}

/// Rewards of the A and B sequences of a batch of pairs in ONE forward of
/// `2b` right-padded rows (A rows first); the head reads each row's last
/// real token. Also the count of real tokens.
///
/// # Shapes
/// `a`, `b`: `b` token rows each -> (`[b]`, `[b]`).
pub fn pair_rewards(
    model: &Model,
    a: &[&[i64]],
    b: &[&[i64]],
    device: Device,
    train: bool,
) -> (Tensor, Tensor, u64) {
    let n = a.len() as i64;
    let rows: Vec<(&[i64], usize)> = a.iter().chain(b).map(|r| (*r, 0)).collect();
    let (ids, mask, _) = right_pad(&rows, model.lm.cfg.pad_id(), device);
    let tokens = rows.iter().map(|(r, _)| r.len() as u64).sum();
    let r = model.scores(&ids, &mask, train).to_kind(Kind::Float);
    (r.narrow(0, 0, n), r.narrow(0, n, n), tokens)
}
