//! Learning-rate schedules: linear warm-up, then cosine decay to
//! `min_lr_ratio * lr`, linear decay to 0, or a constant rate.
//!
//! Conventions are those of Hugging Face's `get_*_schedule_with_warmup`: the
//! rate at optimizer step `s` (0-based) ramps as `s / warmup_steps`, so step
//! 0 runs at 0 when there is a warm-up, and reaches its end value at
//! `s = total_steps`. A schedule is a pure function of the step, so resuming
//! only needs the step count.

use serde::{Deserialize, Serialize};

use alignflow_ops::training::Decay as DecayParam;
use alignflow_ops::PpoLrSchedule;

/// What follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half a cosine from `lr` down to `min_lr_ratio * lr`.
    #[default]
    Cosine,
    /// A straight line from `lr` down to 0.
    Linear,
    /// `lr` throughout.
    Constant,
}

/// The training ops' `params.schedule`.
impl From<DecayParam> for Decay {
    fn from(d: DecayParam) -> Self {
        match d {
            DecayParam::Cosine => Decay::Cosine,
            DecayParam::Linear => Decay::Linear,
            DecayParam::Constant => Decay::Constant,
        }
    }
}

/// `ppo`'s `params.lr_schedule` (one rate per iteration).
impl From<PpoLrSchedule> for Decay {
    fn from(s: PpoLrSchedule) -> Self {
        match s {
            PpoLrSchedule::Constant => Decay::Constant,
            PpoLrSchedule::Linear => Decay::Linear,
        }
    }
}

/// A schedule's configuration, as written in a stage's `params:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer steps of linear warm-up from 0 to `lr`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// The shape after the warm-up.
    #[serde(default)]
    pub decay: Decay,
    /// Cosine only: the final rate as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
}

/// A schedule over a known number of optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    cfg: ScheduleConfig,
    total_steps: u64,
}

impl Schedule {
    /// The schedule of `cfg` over `total_steps` optimizer steps.
    pub fn new(cfg: ScheduleConfig, total_steps: u64) -> Self {
        Self { cfg, total_steps }
    }

    /// The total number of optimizer steps.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The learning rate for optimizer step `step` (0-based); past
    /// `total_steps` it stays at the end value.
    pub fn lr_at(&self, step: u64) -> f64 {
        let c = &self.cfg;
        if step < c.warmup_steps {
            return c.lr * step as f64 / c.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(c.warmup_steps).max(1);
        let progress = ((step - c.warmup_steps) as f64 / span as f64).min(1.0);
        match c.decay {
            Decay::Constant => c.lr,
            Decay::Linear => c.lr * (1.0 - progress),
            Decay::Cosine => {
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> Schedule {
        Schedule::new(
            ScheduleConfig {
                lr: 1e-3,
                warmup_steps: 10,
                decay,
                min_lr_ratio: 0.1,
            },
            110,
        )
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-15
    }

    #[test]
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = schedule(Decay::Cosine);
        assert_eq!(s.lr_at(0), 0.0);
        assert!(close(s.lr_at(5), 5e-4));
        assert!(close(s.lr_at(10), 1e-3));
        // Halfway through the decay: cos(pi/2) = 0, so (0.1 + 0.9 * 0.5) * lr.
        assert!(close(s.lr_at(60), 5.5e-4));
        assert!(close(s.lr_at(110), 1e-4));
        assert!(close(s.lr_at(500), 1e-4));
    }

    #[test]
    fn linear_and_constant() {
        let s = schedule(Decay::Linear);
        assert!(close(s.lr_at(10), 1e-3));
        assert!(close(s.lr_at(60), 5e-4));
        assert_eq!(s.lr_at(110), 0.0);
        let s = schedule(Decay::Constant);
        assert!(close(s.lr_at(5), 5e-4));
        assert_eq!(s.lr_at(10), 1e-3);
        assert_eq!(s.lr_at(110), 1e-3);
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let cfg: ScheduleConfig =
            serde_json::from_str(r#"{"lr": 0.5, "decay": "cosine"}"#).unwrap();
        let s = Schedule::new(cfg, 4);
        assert_eq!(s.lr_at(0), 0.5);
        assert!(close(s.lr_at(2), 0.25));
        assert_eq!(s.lr_at(4), 0.0);
    }
}
