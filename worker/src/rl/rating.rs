//! Direct RLAIF (Lee et al. 2023, "RLAIF vs. RLHF"): the reward of a
//! response is a feedback model's rating of it from 1 to 10, read off its
//! next-token probabilities rather than sampled.
//!
//! The model reads [`rating_prompt`], which ends with `Rating (1 to 10):`.
//! Each score `s` is the continuation `" {s}"` ([`rating_continuation`]);
//! with `l_s` its log-probability, the ten probabilities are renormalised
//! over those ten continuations, `p_s = exp(l_s) / sum_k exp(l_k)`, and the
//! reward is the expected score `E = sum_s s * p_s` rescaled to `[-1, 1]`:
//! `(E - 5.5) / 4.5` ([`expected_rating`], [`rating_reward`]).
//!
//! Scoring the continuations (in the worker, `ops::ppo::reward_source`):
//! `prompt + " 1"` .. `prompt + " 10"` are tokenized whole and each
//! continuation is the tokens after the ten sequences' longest common token
//! prefix, as `ai_feedback` does for ` (A)` / ` (B)`; `l_s` is the sum of its
//! tokens' log-probs. With a tokenizer where `10` is one token (GPT-2's
//! ` 10`, most BPEs) every continuation is one token and the ten `l_s` come
//! from a single next-token distribution. Where `10` is several tokens
//! (`1`, `0`), `l_10 = log p(1) + log p(0 | 1)`; then `p(1)` also covers
//! the continuations of `10`, so the ten are not disjoint events and a
//! model fond of `10` shows some of that mass on `1` too (the renormalisation
//! keeps the result a proper expectation over the ten).

/// Lowest and highest rating.
pub const RATING_MIN: u32 = 1;
pub const RATING_MAX: u32 = 10;

/// The question the feedback model answers; the ten ratings follow it as
/// `" 1"` .. `" 10"`:
///
/// ```text
/// Consider the following conversation between a human and an assistant:
/// {conversation}
/// {principle}                <- trimmed
/// Response: {response}       <- trimmed
/// Rate the response under the principle above on a scale from 1 (worst) to 10 (best).
/// Rating (1 to 10):
/// ```
pub fn rating_prompt(conversation: &str, principle: &str, response: &str) -> String {
    format!(
        "Consider the following conversation between a human and an assistant:\n{conversation}\n{}\nResponse: {}\nRate the response under the principle above on a scale from {RATING_MIN} (worst) to {RATING_MAX} (best).\nRating ({RATING_MIN} to {RATING_MAX}):",
        principle.trim(),
        response.trim()
    )
}

/// The scored continuation of rating `score` (leading space, as a model
/// writes it after the colon).
pub fn rating_continuation(score: u32) -> String {
    format!(" {score}")
}

/// The expected rating `E` in `[1, 10]` from the log-probabilities of the
/// continuations of `1` .. `10` (in that order), renormalised over the ten
/// (log-sum-exp, stable for very negative log-probs). NaN if none is finite.
pub fn expected_rating(logprobs: &[f64; 10]) -> f64 {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return f64::NAN;
    }
    let w: Vec<f64> = logprobs.iter().map(|l| (l - max).exp()).collect();
    let z: f64 = w.iter().sum();
    w.iter()
        .enumerate()
        .map(|(i, wi)| (RATING_MIN as f64 + i as f64) * wi / z)
        .sum()
}

/// `E` in `[1, 10]` rescaled to `[-1, 1]`: `(E - 5.5) / 4.5`.
pub fn rating_reward(expected: f64) -> f64 {
    let (lo, hi) = (RATING_MIN as f64, RATING_MAX as f64);
    (expected - (lo + hi) / 2.0) / ((hi - lo) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::test_util::assert_close;

    #[test]
    fn uniform_probabilities_give_the_midpoint_and_reward_zero() {
        let e = expected_rating(&[-3.7; 10]);
        assert_close(e, 5.5, 1e-12);
        assert_close(rating_reward(e), 0.0, 1e-12);
    }

    #[test]
    fn all_mass_on_one_score_gives_that_score() {
        let mut lp = [f64::NEG_INFINITY; 10];
        lp[9] = 0.0;
        assert_close(rating_reward(expected_rating(&lp)), 1.0, 1e-12);
        let mut lp = [-1e4; 10];
        lp[0] = -0.5;
        assert_close(rating_reward(expected_rating(&lp)), -1.0, 1e-12);
    }

    #[test]
    fn a_given_distribution_gives_the_hand_value() {
        // Unnormalised masses 1, 2, 1 on the ratings 2, 3, 10 (log-probs
        // off by a common constant, which the renormalisation removes):
        // p = 0.25, 0.5, 0.25; E = 0.5 + 1.5 + 2.5 = 4.5; reward = -1/4.5.
        let c = -7.0;
        let mut lp = [f64::NEG_INFINITY; 10];
        lp[1] = c;
        lp[2] = c + 2f64.ln();
        lp[9] = c;
        let e = expected_rating(&lp);
        assert_close(e, 4.5, 1e-12);
        assert_close(rating_reward(e), -1.0 / 4.5, 1e-12);
    }

    #[test]
    fn very_negative_logprobs_stay_finite() {
        let lp: [f64; 10] = std::array::from_fn(|i| -1e5 - i as f64);
        let e = expected_rating(&lp);
        assert!(e.is_finite() && (1.0..=10.0).contains(&e), "{e}");
        assert!(expected_rating(&[f64::NEG_INFINITY; 10]).is_nan());
    }

    #[test]
    fn the_prompt_ends_with_the_cue_and_holds_its_parts() {
        let p = rating_prompt("Human: hi", " Be kind. ", " hello \n");
        assert!(p.ends_with("Rating (1 to 10):"), "{p}");
        assert!(
            p.contains("\nHuman: hi\nBe kind.\nResponse: hello\n"),
            "{p}"
        );
        assert_eq!(rating_continuation(10), " 10");
    }
}
