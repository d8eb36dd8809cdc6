//! Rotary position embeddings: the inverse frequencies a config's
//! `rope_parameters` (transformers 5) or `rope_scaling` (older configs)
//! asks for, computed as transformers' `modeling_rope_utils.py` computes
//! them (same float32 operations in the same order, so the frequencies
//! match bit for bit): `default`, `linear`, `llama3`, `yarn` and Phi-3's
//! `longrope` (short factors, or long ones once a forward pass reaches
//! past the original context). `dynamic`, which rescales as sequences
//! grow, is refused.

use std::f64::consts::PI;

use anyhow::Context;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

/// The rotary embedding of a Llama-family config.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base wavelength (`rope_theta`).
    pub theta: f64,
    pub scaling: Scaling,
}

/// How the frequencies are rescaled for contexts longer than pretraining's.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaling {
    /// `rope_type: default`.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
    /// YaRN (`rope_type: yarn`): interpolation ramped over the dimensions,
    /// cos and sin multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_positions: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// Phi-3's LongRoPE (`rope_type: longrope`): per-frequency divisors,
    /// `short` while a forward pass stays within the original context,
    /// `long` beyond it; cos and sin multiplied by `attention_factor`.
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max_positions: f64,
        attention_factor: f64,
    },
}

/// A number under `key` of the RoPE parameters, if present and not null.
fn number(params: &Map<String, Value>, key: &str) -> anyhow::Result<Option<f64>> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("RoPE parameter `{key}` is not a number: {v}")),
    }
}

fn required(params: &Map<String, Value>, key: &str, kind: &str) -> anyhow::Result<f64> {
    number(params, key)?.with_context(|| format!("rope_type `{kind}` needs `{key}`"))
}

/// A family's RoPE bases where its config names none (transformers'
/// config class defaults): SmolLM3 2e6, Gemma 3 1e6 on full-attention
/// layers and 1e4 on sliding ones, 1e4 elsewhere.
#[derive(Debug, Clone, Copy)]
pub struct ThetaDefaults {
    pub global: f64,
    /// The sliding layers' own base, for the families that have one.
    pub local: Option<f64>,
}

impl Rope {
    /// Reads the RoPE settings of a `config.json` as transformers'
    /// `convert_rope_params_to_dict` does: `rope_scaling` wins over
    /// `rope_parameters`; `rope_theta` comes from them, else the top level,
    /// else 10000; `original_max_position_embeddings` from the top level,
    /// else them, else `max_position_embeddings`.
    pub fn from_config(raw: &Value, max_positions: i64) -> anyhow::Result<Rope> {
        let (source, params) = Self::params(raw)?;
        // Nested per layer type (`{"full_attention": {...}, ...}`): each
        // kind of layer rotates differently (see [`Rope::per_layer_type`]).
        if let Some((key, _)) = params.iter().find(|(_, v)| v.is_object()) {
            anyhow::bail!(
                "{}: RoPE parameters per layer type (`{key}`) are not supported",
                source.unwrap_or("rope_parameters")
            );
        }
        Self::from_params(raw, &params, max_positions, 10000.0)
    }

    /// The rotary embedding of full-attention layers and, when it differs,
    /// of sliding-window layers: `rope_parameters` nested per layer type
    /// (transformers 5's Gemma 3), or Gemma 3's older `rope_local_base_freq`
    /// (a plain RoPE of that base for the sliding layers). `theta` holds
    /// the family's bases where the config names none.
    pub fn per_layer_type(
        raw: &Value,
        max_positions: i64,
        theta: ThetaDefaults,
    ) -> anyhow::Result<(Rope, Option<Rope>)> {
        let (source, params) = Self::params(raw)?;
        if params.values().any(Value::is_object) {
            let of = |kind: &str| -> anyhow::Result<Rope> {
                let nested = params
                    .get(kind)
                    .and_then(Value::as_object)
                    .with_context(|| {
                        format!(
                            "{}: per layer type, but no `{kind}` object",
                            source.unwrap_or("rope_parameters")
                        )
                    })?;
                let default = match kind {
                    "sliding_attention" => theta.local.unwrap_or(theta.global),
                    _ => theta.global,
                };
                Self::from_params(raw, nested, max_positions, default)
            };
            if let Some(other) = params
                .keys()
                .find(|k| !["full_attention", "sliding_attention"].contains(&k.as_str()))
            {
                anyhow::bail!("RoPE parameters for layer type `{other}` are not supported");
            }
            return Ok((of("full_attention")?, Some(of("sliding_attention")?)));
        }
        let full = Self::from_params(raw, &params, max_positions, theta.global)?;
        let local = raw
            .get("rope_local_base_freq")
            .and_then(Value::as_f64)
            .or(theta.local)
            .map(|theta| Rope {
                theta,
                scaling: Scaling::None,
            });
        Ok((full, local))
    }

    /// Where the RoPE settings are (`rope_scaling` wins) and what they say.
    fn params(raw: &Value) -> anyhow::Result<(Option<&'static str>, Map<String, Value>)> {
        let present = |key: &str| raw.get(key).filter(|v| !v.is_null());
        let source = ["rope_scaling", "rope_parameters"]
            .into_iter()
            .find(|k| present(k).is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())));
        let params = match source {
            Some(key) => present(key)
                .and_then(Value::as_object)
                .with_context(|| format!("`{key}` is not an object"))?
                .clone(),
            None => Map::new(),
        };
        Ok((source, params))
    }

    /// The settings of one rotary embedding, `params` beside the config's
    /// top-level keys.
    fn from_params(
        raw: &Value,
        params: &Map<String, Value>,
        max_positions: i64,
        default_theta: f64,
    ) -> anyhow::Result<Rope> {
        let partial = number(&params, "partial_rotary_factor")?
            .or(raw.get("partial_rotary_factor").and_then(Value::as_f64));
        if let Some(p) = partial.filter(|p| *p != 1.0) {
            anyhow::bail!(
                "partial_rotary_factor {p} is not supported (RoPE on every dimension only)"
            );
        }
        let theta = number(&params, "rope_theta")?
            .or(raw.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(default_theta);
        let mut kind = params
            .get("rope_type")
            .or(params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // transformers' Phi3Config reads the names early Phi-3 128k
        // configs used (`su`, `yarn`, with short and long factors) as
        // LongRoPE.
        if raw.get("model_type").and_then(Value::as_str) == Some("phi3")
            && matches!(kind, "su" | "yarn")
        {
            kind = "longrope";
        }
        let original = || -> anyhow::Result<f64> {
            Ok(raw
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
                .or(number(&params, "original_max_position_embeddings")?)
                .unwrap_or(max_positions as f64))
        };
        let scaling = match kind {
            "default" => Scaling::None,
            "linear" => Scaling::Linear {
                factor: required(&params, "factor", kind)?,
            },
            "llama3" => Scaling::Llama3 {
                factor: required(&params, "factor", kind)?,
                low_freq_factor: required(&params, "low_freq_factor", kind)?,
                high_freq_factor: required(&params, "high_freq_factor", kind)?,
                original_max_positions: original()?,
            },
            "yarn" => Self::yarn(&params, max_positions, original()?)?,
            "longrope" => Self::longrope(&params, max_positions, original()?)?,
            other => anyhow::bail!(
                "rope_type `{other}` is not supported (default, linear, llama3, yarn, longrope)"
            ),
        };
        Ok(Rope { theta, scaling })
    }

    /// YaRN's settings with transformers' defaults (`_compute_yarn_parameters`).
    fn yarn(
        params: &Map<String, Value>,
        max_positions: i64,
        original: f64,
    ) -> anyhow::Result<Scaling> {
        let factor = number(params, "factor")?.unwrap_or(max_positions as f64 / original);
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match (
            number(params, "attention_factor")?,
            number(params, "mscale")?.filter(|m| *m != 0.0),
            number(params, "mscale_all_dim")?.filter(|m| *m != 0.0),
        ) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
            _ => mscale(factor, 1.0),
        };
        // `or` in Python: 0 and null both mean the default.
        let beta = |key: &str, default: f64| -> anyhow::Result<f64> {
            Ok(number(params, key)?
                .filter(|b| *b != 0.0)
                .unwrap_or(default))
        };
        Ok(Scaling::Yarn {
            factor,
            original_max_positions: original,
            beta_fast: beta("beta_fast", 32.0)?,
            beta_slow: beta("beta_slow", 1.0)?,
            attention_factor,
            truncate: params
                .get("truncate")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }

    /// LongRoPE's settings (`_compute_longrope_parameters`): the factor
    /// defaults to the context's growth, the attention factor to
    /// `sqrt(1 + ln(factor) / ln(original))`.
    fn longrope(
        params: &Map<String, Value>,
        max_positions: i64,
        original: f64,
    ) -> anyhow::Result<Scaling> {
        let factors = |key: &str| -> anyhow::Result<Vec<f64>> {
            params
                .get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .with_context(|| format!("rope_type `longrope` needs `{key}`, a list of numbers"))
        };
        let factor = number(params, "factor")?.unwrap_or(max_positions as f64 / original);
        let attention_factor = match number(params, "attention_factor")? {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / original.ln()).sqrt(),
        };
        Ok(Scaling::LongRope {
            short: factors("short_factor")?,
            long: factors("long_factor")?,
            original_max_positions: original,
            attention_factor,
        })
    }

    /// Checks the settings fit heads of `head_dim` (LongRoPE lists one
    /// factor per frequency).
    pub fn check_dim(&self, head_dim: i64) -> anyhow::Result<()> {
        if let Scaling::LongRope { short, long, .. } = &self.scaling {
            for (key, list) in [("short_factor", short), ("long_factor", long)] {
                anyhow::ensure!(
                    list.len() as i64 == head_dim / 2,
                    "rope `{key}` has {} entries, head_dim {head_dim} needs {}",
                    list.len(),
                    head_dim / 2
                );
            }
        }
        Ok(())
    }

    /// The factor cos and sin are multiplied by (YaRN's and LongRoPE's; 1
    /// otherwise).
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            Scaling::Yarn {
                attention_factor, ..
            }
            | Scaling::LongRope {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// LongRoPE's inverse frequencies beyond the original context, and that
    /// context's length (`None` for the other scalings).
    pub fn long_inv_freq(&self, dim: i64, device: Device) -> Option<(Tensor, i64)> {
        match &self.scaling {
            Scaling::LongRope {
                long,
                original_max_positions,
                ..
            } => Some((
                self.divided(dim, long).to_device(device),
                *original_max_positions as i64,
            )),
            _ => None,
        }
    }

    /// `1 / (factors * base ** (arange(0, dim, 2) / dim))` in float32, as
    /// LongRoPE computes it.
    fn divided(&self, dim: i64, factors: &[f64]) -> Tensor {
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / dim as f64;
        let powers = Tensor::from(self.theta)
            .to_kind(Kind::Float)
            .pow(&exponents);
        let factors = Tensor::from_slice(factors).to_kind(Kind::Float);
        (factors * powers).reciprocal()
    }

    /// The inverse frequencies, `[dim / 2]` float32 on `device` (computed on
    /// the CPU, as transformers computes them before moving the buffer).
    pub fn inv_freq(&self, dim: i64, device: Device) -> Tensor {
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / dim as f64;
        // `base ** exponents`, then `1.0 / ..`.
        let powers = Tensor::from(self.theta)
            .to_kind(Kind::Float)
            .pow(&exponents);
        let inv_freq = powers.reciprocal();
        let scaled = match self.scaling {
            Scaling::None => inv_freq,
            Scaling::Linear { factor } => inv_freq / factor,
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => llama3(
                &inv_freq,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            ),
            Scaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let ramp = yarn_ramp(
                    dim,
                    self.theta,
                    original_max_positions,
                    beta_fast,
                    beta_slow,
                    truncate,
                );
                let interpolation = (&powers * factor).reciprocal();
                let extrapolation_factor = -ramp + 1.0;
                interpolation * (-&extrapolation_factor + 1.0) + inv_freq * extrapolation_factor
            }
            Scaling::LongRope { ref short, .. } => self.divided(dim, short),
        };
        scaled.to_device(device)
    }
}

/// `_compute_llama3_parameters`: wavelengths above the original context
/// divided by `factor`, below a quarter of it (by default) kept, smoothly
/// interpolated between.
fn llama3(inv_freq: &Tensor, factor: f64, low: f64, high: f64, original: f64) -> Tensor {
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    let wavelen = inv_freq.reciprocal() * (2.0 * PI);
    let by_factor = inv_freq / factor;
    let kept = by_factor.where_self(&wavelen.gt(low_wavelen), inv_freq);
    let smooth = (wavelen.reciprocal() * original - low) / (high - low);
    let smoothed = (-&smooth + 1.0) * &kept / factor + &smooth * &kept;
    let medium = wavelen.lt(high_wavelen).logical_not() * wavelen.gt(low_wavelen).logical_not();
    smoothed.where_self(&medium, &kept)
}

/// YaRN's ramp over the `dim / 2` frequencies: 0 where the rotation count
/// over the original context passes `beta_fast`, 1 below `beta_slow`.
fn yarn_ramp(
    dim: i64,
    base: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> Tensor {
    let correction_dim = |rotations: f64| {
        (dim as f64 * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
    if low == high {
        high += 0.001; // as transformers: no division by zero
    }
    let linear = (Tensor::arange(dim / 2, (Kind::Float, Device::Cpu)) - low) / (high - low);
    linear.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rope(raw: Value) -> anyhow::Result<Rope> {
        Rope::from_config(&raw, 128)
    }

    #[test]
    fn old_rope_scaling_wins_and_theta_comes_from_the_top_level() {
        let r = rope(json!({
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}
        }))
        .unwrap();
        assert_eq!(r.theta, 500000.0);
        assert!(
            matches!(r.scaling, Scaling::Llama3 { original_max_positions, .. } if original_max_positions == 16.0)
        );
        let linear = rope(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
        assert_eq!(linear.scaling, Scaling::Linear { factor: 2.0 });
        assert_eq!(linear.theta, 10000.0);
    }

    #[test]
    fn unsupported_rope_settings_are_refused_by_name() {
        for (raw, needle) in [
            (
                json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
                "rope_type `dynamic`",
            ),
            (
                json!({"rope_parameters": {"rope_type": "longrope", "long_factor": [1.0]}}),
                "needs `short_factor`",
            ),
            (
                json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
                "low_freq_factor",
            ),
            (
                json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
                "`full_attention`",
            ),
        ] {
            let err = format!("{:#}", rope(raw).unwrap_err());
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = rope(json!({})).unwrap().inv_freq(16, Device::Cpu);
        let r = rope(json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .unwrap();
        let scaled = r.inv_freq(16, Device::Cpu);
        // The first frequency (wavelength 2π < 64/4) is kept, the last
        // (wavelength about 2π·10000^(7/8) > 64) divided by 8.
        assert_eq!(scaled.double_value(&[0]), plain.double_value(&[0]));
        let (last, was) = (scaled.double_value(&[7]), plain.double_value(&[7]));
        assert!((last - was / 8.0).abs() < 1e-12, "{last} vs {was}");
    }

    #[test]
    fn yarn_defaults_follow_transformers() {
        let r = rope(
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32}}),
        )
        .unwrap();
        assert!((r.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        let Scaling::Yarn {
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = r.scaling
        else {
            panic!("{r:?}")
        };
        assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
    }
}
