//! A small training-step driver tying the pieces together: reseed torch,
//! accumulate gradients, clip, step AdamW at the scheduled rate, count, and
//! checkpoint or resume; with a data-parallel group, average the gradients
//! over the ranks before clipping. Ops with unusual loops (PPO's
//! rollout/update phases) can use the pieces directly instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use super::accumulate::{accumulate, scale_gradients, MicroBatch};
use super::checkpoint::{load_checkpoint, CheckpointError, CheckpointState, Checkpoints};
use super::clip::clip_grad_norm;
use super::loop_state::{rank_seed, seed_torch_for_step, TrainState};
use super::optim::{AdamW, AdamWConfig, OptimError};
use super::schedule::{Schedule, ScheduleConfig};
use crate::dist::{DistError, Group};

/// The training knobs of an op's `params:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// AdamW hyper-parameters.
    #[serde(default)]
    pub optimizer: AdamWConfig,
    /// Learning rate and its schedule.
    pub schedule: ScheduleConfig,
    /// Clip the global gradient norm to this; `null` to not clip.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_accum_steps")]
    pub accum_steps: usize,
    /// Skip the optimizer step when the gradient norm is infinite or NaN.
    #[serde(default = "default_true")]
    pub skip_nonfinite: bool,
    /// Base seed of the data order and of the per-step torch seeds.
    #[serde(default)]
    pub seed: u64,
}

fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_accum_steps() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// The step just taken (1-based: the count of steps after it).
    pub step: u64,
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// The learning rate it ran at.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in this step.
    pub tokens: u64,
    /// Tokens per second over this step's wall time.
    pub tokens_per_s: f64,
    /// Whether the update was skipped for a non-finite gradient norm.
    pub skipped: bool,
}

/// Drives optimizer steps over one model's `VarStore`.
pub struct Trainer {
    cfg: TrainerConfig,
    opt: AdamW,
    schedule: Schedule,
    state: TrainState,
    group: Option<&'static Group>,
}

impl Trainer {
    /// A trainer for the trainable variables of `vs`, for `total_steps`
    /// optimizer steps, starting at step 0.
    pub fn new(vs: &VarStore, cfg: TrainerConfig, total_steps: u64) -> Result<Self, OptimError> {
        let opt = AdamW::from_var_store(vs, cfg.optimizer.clone())?;
        let schedule = Schedule::new(cfg.schedule.clone(), total_steps);
        Ok(Self {
            cfg,
            opt,
            schedule,
            state: TrainState::default(),
            group: None,
        })
    }

    /// Averages every step's gradients over `group`'s ranks (after the
    /// backward passes, before clipping), and reports the step's loss and
    /// tokens over all ranks. Each rank's micro-batch losses must then be
    /// its share of the whole batch's loss (see `ops::training`), so that
    /// the average is the whole batch's gradient; ranks that start equal
    /// stay equal, since they take the same step from the same gradient.
    pub fn data_parallel(mut self, group: &'static Group) -> Self {
        self.group = Some(group);
        self
    }

    /// The loop counters.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The optimizer (to change weight-decay groups, inspect state).
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// The base seed, for [`TrainState::next_batch`].
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// Whether all `total_steps` have been taken.
    pub fn done(&self) -> bool {
        self.state.step >= self.schedule.total_steps()
    }

    /// One optimizer step. `micro(i, state)` computes micro-batch `i`'s loss
    /// (drawing its examples with `state.next_batch`, which moves the data
    /// cursor); torch is reseeded for the step first, so the step is
    /// reproducible after a resume.
    pub fn step<E: From<OptimError> + From<DistError>>(
        &mut self,
        mut micro: impl FnMut(usize, &mut TrainState) -> Result<MicroBatch, E>,
    ) -> Result<StepMetrics, E> {
        let start = Instant::now();
        let rank = self.group.map_or(0, |g| g.rank());
        seed_torch_for_step(rank_seed(self.cfg.seed, rank), self.state.step);
        self.opt.zero_grad();
        let state = &mut self.state;
        let mut acc = accumulate(self.cfg.accum_steps, |i| micro(i, state))?;
        // The gradients hold `weight` times those of the step's mean: over
        // the ranks too, each rank's weight being its own.
        let mut scale = 1.0;
        if let Some(group) = self.group {
            crate::dist::average_gradients(group, &self.opt.params())?;
            let sums = group.sum_f64(&[acc.weighted_loss, acc.weight, acc.tokens as f64])?;
            (acc.weighted_loss, acc.weight, acc.tokens) = (sums[0], sums[1], sums[2] as u64);
            scale = group.world() as f64;
        }
        if acc.weight > 0.0 {
            scale_gradients(&self.opt.params(), scale / acc.weight);
        }
        // Without clipping the norm is still measured, for the metrics.
        let grad_norm = clip_grad_norm(
            &self.opt.params(),
            self.cfg.max_grad_norm.unwrap_or(f64::INFINITY),
        );
        let lr = self.schedule.lr_at(self.state.step);
        let skipped = self.cfg.skip_nonfinite && !grad_norm.is_finite();
        if skipped {
            tracing::warn!(
                step = self.state.step,
                grad_norm,
                "non-finite gradient norm: update skipped"
            );
        } else {
            self.opt.step(lr)?;
        }
        self.state.step += 1;
        self.state.tokens_seen += acc.tokens;
        let secs = start.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: self.state.step,
            loss: acc.loss(),
            lr,
            grad_norm,
            tokens: acc.tokens,
            tokens_per_s: per_second(acc.tokens, secs),
            skipped,
        })
    }

    /// Saves a checkpoint of the model, optimizer and counters, with `extra`
    /// op state, and returns its folder.
    pub fn save(
        &self,
        ckpts: &Checkpoints,
        vs: &VarStore,
        extra: serde_json::Value,
    ) -> Result<PathBuf, CheckpointError> {
        let lr = self.schedule.lr_at(self.state.step.saturating_sub(1));
        ckpts.save(
            vs,
            &self.opt,
            &CheckpointState {
                train: self.state,
                lr,
                extra,
            },
        )
    }

    /// Restores the checkpoint in `dir` into `vs` and this trainer, and
    /// returns the op's `extra` state.
    pub fn resume(
        &mut self,
        dir: &Path,
        vs: &mut VarStore,
    ) -> Result<serde_json::Value, CheckpointError> {
        let saved = load_checkpoint(dir, vs, &mut self.opt)?;
        self.state = saved.train;
        Ok(saved.extra)
    }
}

/// `count` per second over `secs` (0 when no time passed).
pub fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint::latest;
    use tch::nn::Init;
    use tch::{Device, Kind, Tensor};

    const N: usize = 16;

    /// A fixed regression set: 16 rows of 3 features, and targets.
    fn data() -> (Tensor, Tensor) {
        let x = (Tensor::arange(3 * N as i64, tch::kind::FLOAT_CPU) * 0.37)
            .sin()
            .reshape([N as i64, 3]);
        let y = x.matmul(&Tensor::from_slice(&[1.5f32, -2.0, 0.5]).reshape([3, 1])) + 0.3;
        (x, y)
    }

    /// A linear model; `init` differs between the runs so a resume that
    /// failed to load would show.
    fn model(init: f64) -> (VarStore, Tensor, Tensor) {
        let vs = VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .sub("lin")
            .var("weight", &[3, 1], Init::Const(init));
        let b = vs.root().sub("lin").var("bias", &[1], Init::Const(0.0));
        (vs, w, b)
    }

    fn config() -> TrainerConfig {
        serde_json::from_value(serde_json::json!({
            "optimizer": {"weight_decay": 0.1},
            "schedule": {"lr": 0.05, "warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
            "max_grad_norm": 1.0,
            "accum_steps": 2,
            "seed": 11,
        }))
        .unwrap()
    }

    /// Runs steps until `stop`, returning the losses.
    fn train(trainer: &mut Trainer, w: &Tensor, b: &Tensor, stop: u64) -> Vec<f64> {
        let (x, y) = data();
        let seed = trainer.seed();
        let mut losses = Vec::new();
        while trainer.state().step < stop {
            let m = trainer
                .step::<anyhow::Error>(|_, state| {
                    let idx: Vec<i64> = state
                        .next_batch(N, 2, seed)
                        .into_iter()
                        .map(|i| i as i64)
                        .collect();
                    let idx = Tensor::from_slice(&idx);
                    let (xs, ys) = (x.index_select(0, &idx), y.index_select(0, &idx));
                    // No dropout: tests share torch's global generator across
                    // threads, so a draw here would race with other tests.
                    let loss = (xs.matmul(w) + b - ys).square().mean(Kind::Float);
                    Ok(MicroBatch {
                        loss,
                        tokens: 2,
                        weight: 2.0,
                    })
                })
                .unwrap();
            assert!(!m.skipped);
            losses.push(m.loss);
        }
        losses
    }

    #[test]
    fn resume_is_bit_identical_to_an_uninterrupted_run() {
        let _rng = crate::testing::torch_rng();
        let (vs, w, b) = model(0.0);
        let mut trainer = Trainer::new(&vs, config(), 10).unwrap();
        let full = train(&mut trainer, &w, &b, 10);
        assert!(full[9] < full[0], "{full:?}");
        assert_eq!(trainer.state().tokens_seen, 40);
        assert_eq!((trainer.state().epoch, trainer.state().cursor), (2, 8));

        let root = std::env::temp_dir().join(format!("alignflow-trainer-{}", std::process::id()));
        let ckpts = Checkpoints::new(&root, 2);
        let first = {
            let (vs, w, b) = model(0.0);
            let mut trainer = Trainer::new(&vs, config(), 10).unwrap();
            let mut first = train(&mut trainer, &w, &b, 3);
            trainer.save(&ckpts, &vs, serde_json::Value::Null).unwrap();
            first.extend(train(&mut trainer, &w, &b, 5));
            trainer
                .save(&ckpts, &vs, serde_json::json!({"best": 1.0}))
                .unwrap();
            first
        };
        let (mut vs2, w2, b2) = model(0.7);
        let mut resumed = Trainer::new(&vs2, config(), 10).unwrap();
        let dir = latest(&root).unwrap().unwrap();
        assert!(dir.ends_with("step-00000005"));
        assert_eq!(
            resumed.resume(&dir, &mut vs2).unwrap(),
            serde_json::json!({"best": 1.0})
        );
        let rest = train(&mut resumed, &w2, &b2, 10);
        std::fs::remove_dir_all(&root).unwrap();

        assert_eq!([first, rest].concat(), full);
        assert_eq!(resumed.state(), trainer.state());
        assert!(w2.equal(&w) && b2.equal(&b), "weights differ: {w2} vs {w}");
    }
}
