//! KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language
//! Models from Human Preferences"): fixed, and adaptive. The state is
//! serde-serialisable so it can be saved in checkpoints.

use serde::{Deserialize, Serialize};

/// KL coefficient controller; [`KlController::value`] is the current `kl_coef`.
///
/// Serialised as e.g. `{"type":"fixed","kl_coef":0.05}` or
/// `{"type":"adaptive","kl_coef":0.2,"target":6.0,"horizon":10000.0}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KlController {
    /// Constant coefficient.
    Fixed { kl_coef: f64 },
    /// Adaptive coefficient steering the KL towards `target` over `horizon` steps.
    Adaptive {
        kl_coef: f64,
        target: f64,
        horizon: f64,
    },
}

impl KlController {
    /// A fixed controller.
    pub fn fixed(kl_coef: f64) -> Self {
        KlController::Fixed { kl_coef }
    }

    /// An adaptive controller starting at `init_kl_coef`.
    pub fn adaptive(init_kl_coef: f64, target: f64, horizon: f64) -> Self {
        KlController::Adaptive {
            kl_coef: init_kl_coef,
            target,
            horizon,
        }
    }

    /// The current KL coefficient.
    pub fn value(&self) -> f64 {
        match self {
            KlController::Fixed { kl_coef } | KlController::Adaptive { kl_coef, .. } => *kl_coef,
        }
    }

    /// Sets the current coefficient (restoring a checkpoint bit-exactly).
    pub fn set_value(&mut self, value: f64) {
        match self {
            KlController::Fixed { kl_coef } | KlController::Adaptive { kl_coef, .. } => {
                *kl_coef = value
            }
        }
    }

    /// Updates after a batch with mean (sequence-level) KL `current_kl` that
    /// took `n_steps` samples. Fixed: no-op. Adaptive:
    /// `e = clip(current_kl / target - 1, -0.2, 0.2)`,
    /// `kl_coef *= 1 + e * n_steps / horizon`.
    pub fn update(&mut self, current_kl: f64, n_steps: u64) {
        if let KlController::Adaptive {
            kl_coef,
            target,
            horizon,
        } = self
        {
            let e = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            let mult = 1.0 + e * n_steps as f64 / *horizon;
            *kl_coef *= mult;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn fixed_does_not_move() {
        let mut c = KlController::fixed(0.05);
        c.update(100.0, 1000);
        assert_eq!(c.value(), 0.05);
    }

    #[test]
    fn adaptive_two_steps_by_hand() {
        // init 0.2, target 6, horizon 10000
        let mut c = KlController::adaptive(0.2, 6.0, 10000.0);
        // step 1: KL 9, n 512: e = clip(9/6 - 1 = 0.5) = 0.2;
        //   mult = 1 + 0.2*512/10000 = 1.01024; coef = 0.2*1.01024 = 0.202048
        c.update(9.0, 512);
        assert_close(c.value(), 0.202048, 1e-15);
        // step 2: KL 5.4, n 256: e = 5.4/6 - 1 = -0.1 (inside the clip);
        //   mult = 1 - 0.1*256/10000 = 0.99744; coef = 0.202048*0.99744 = 0.20153075712
        c.update(5.4, 256);
        assert_close(c.value(), 0.20153075712, 1e-15);
        // far below target: clipped at -0.2: mult = 1 - 0.2*10000/10000 = 0.8
        let mut d = KlController::adaptive(1.0, 6.0, 10000.0);
        d.update(0.0, 10000);
        assert_close(d.value(), 0.8, 1e-15);
    }

    #[test]
    fn serde_round_trip() {
        let mut c = KlController::adaptive(0.2, 6.0, 10000.0);
        c.update(9.0, 512);
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"type\":\"adaptive\""), "{s}");
        let back: KlController = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        let f: KlController = serde_json::from_str(r#"{"type":"fixed","kl_coef":0.05}"#).unwrap();
        assert_eq!(f, KlController::fixed(0.05));
    }
}
