//! A tiny world for the RL tests: dialogues about a few topics, and
//! comparisons whose chosen response is half the word `a` (the rejected one
//! has few), so a preference model trained on them likes `a` and a policy
//! has something to learn. Seeded: every test sees the same data.

use super::Lcg;

pub const WORDS: &[&str] = &[
    "the", "sun", "moon", "fish", "red", "blue", "green", "sky", "tree", "dog", "big", "on", "ice",
    "fox", "sit", "run",
];

/// A raw prompt (`tell me about the sun`).
pub fn topic(rng: &mut Lcg) -> String {
    format!("tell me about the {}", rng.pick(WORDS))
}

/// `q` in the HH dialogue format, ready for the answer.
pub fn dialogue(q: &str) -> String {
    format!("\n\nHuman: {q}\n\nAssistant:")
}

/// A dialogue prompt.
pub fn prompt(rng: &mut Lcg) -> String {
    dialogue(&topic(rng))
}

/// `n` words, each the word `a` with probability `share_a` percent.
pub fn response(rng: &mut Lcg, n: usize, share_a: usize) -> String {
    let words: Vec<&str> = (0..n)
        .map(|_| {
            if rng.below(100) < share_a {
                "a"
            } else {
                rng.pick(WORDS)
            }
        })
        .collect();
    format!(" {}", words.join(" "))
}

/// HH-format dialogues for the tokenizer and the base LMs: `a` one word in
/// ten.
pub fn corpus(n: usize) -> String {
    let mut rng = Lcg(3);
    (0..n)
        .map(|_| {
            let q = prompt(&mut rng);
            serde_json::json!({
                "chosen": format!("{q}{}", response(&mut rng, 8, 10)),
                "rejected": format!("{q}{}", response(&mut rng, 8, 10)),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Comparisons for the PM: the chosen response is half `a`.
pub fn comparisons(n: usize) -> String {
    let mut rng = Lcg(11);
    (0..n)
        .map(|_| {
            serde_json::json!({
                "prompt": prompt(&mut rng),
                "chosen": response(&mut rng, 8, 50),
                "rejected": response(&mut rng, 8, 5),
                "label": 1.0,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// `n` prompt records (`{"prompt": ...}`) from `make`, seeded with `seed`.
pub fn prompts(n: usize, seed: u64, make: fn(&mut Lcg) -> String) -> String {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| serde_json::json!({ "prompt": make(&mut rng) }).to_string() + "\n")
        .collect()
}
